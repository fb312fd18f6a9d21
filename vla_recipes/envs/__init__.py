"""Simulator environments for closed-loop work: LeRobot env configs as this kit collects and rolls out in them."""


def env_camera_keys(env_cfg) -> list[str]:
    """The observation keys of a LeRobot env config's cameras, as ``preprocess_observation`` names them."""
    from lerobot.configs import FeatureType

    return [env_cfg.features_map.get(key, key) for key, ft in env_cfg.features.items() if ft.type is FeatureType.VISUAL]
