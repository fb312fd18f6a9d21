"""Reading LeRobot's pi0 / pi0.5 checkpoint folders (the lerobot/pi05_base layout) into a Pi05Config.

Such a folder holds ``config.json`` (``"type": "pi05"`` or ``"pi0"``, LeRobot's field names, sizes given as Gemma
variant names), ``model.safetensors`` (whose keys our model shares, so the weights load unchanged) and the
pre-processor's normaliser statistics in a safetensors file that ``policy_preprocessor.json`` names.
"""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import load_file
from transformers.utils import cached_file

# The sizes behind LeRobot's variant names (openpi gemma.py `get_config`).
GEMMA_VARIANTS: dict[str, dict[str, int]] = {
    "gemma_2b": {"width": 2048, "depth": 18, "mlp_dim": 16_384, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
    "gemma_300m": {"width": 1024, "depth": 18, "mlp_dim": 4096, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
}
# A LeRobot folder carries one dataset's statistics but not its name; they are filed under this key.
LEROBOT_STATS_KEY = "lerobot"

_NORM_MODES = {"QUANTILES": "quantiles", "MEAN_STD": "mean_std", "MIN_MAX": "min_max", "IDENTITY": "identity"}
_STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
# LeRobot field -> our field, for the fields that only differ by name (or not at all).
_RENAMED = {
    "chunk_size": "action_horizon",
    "max_action_dim": "max_action_dim",
    "max_state_dim": "max_state_dim",
    "num_inference_steps": "num_inference_steps",
    "tokenizer_max_length": "tokenizer_max_length",
    "time_sampling_beta_alpha": "time_beta_alpha",
    "time_sampling_beta_beta": "time_beta_beta",
    "time_sampling_scale": "time_scale",
    "time_sampling_offset": "time_offset",
    "min_period": "min_period",
    "max_period": "max_period",
    "dtype": "dtype",
}
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def is_lerobot_config(config_dict: dict[str, Any]) -> bool:
    """LeRobot writes ``type``; transformers writes ``model_type``."""
    return "type" in config_dict and "model_type" not in config_dict


def _variant(name: str) -> dict[str, int]:
    if name not in GEMMA_VARIANTS:
        raise ValueError(f"unknown LeRobot Gemma variant {name!r}; expected one of {sorted(GEMMA_VARIANTS)}")
    return GEMMA_VARIANTS[name]


def _norm_mode(mapping: dict[str, str], default: str) -> str:
    """One mode for state and action, as both our processor and LeRobot's pi presets use."""
    state, action = mapping.get("STATE", default), mapping.get("ACTION", default)
    if state != action:
        raise ValueError(
            f"LeRobot config normalises STATE with {state} and ACTION with {action}; only one mode is supported"
        )
    return _NORM_MODES[action]


def pi05_kwargs_from_lerobot(lerobot: dict[str, Any]) -> dict[str, Any]:
    """Map a LeRobot ``PI05Config``/``PI0Config`` dict to ``Pi05Config`` keyword arguments.

    Fields LeRobot omits keep our defaults, which equal LeRobot's.
    """
    kind = lerobot["type"]
    if kind not in ("pi05", "pi0"):
        raise ValueError(f"config.json describes a LeRobot {kind!r} policy; Pi05Config reads only 'pi05' and 'pi0'")
    vlm = _variant(lerobot.get("paligemma_variant", "gemma_2b"))
    expert = _variant(lerobot.get("action_expert_variant", "gemma_300m"))
    resolution = lerobot.get("image_resolution", [224, 224])
    if resolution[0] != resolution[1]:
        raise ValueError(f"LeRobot image_resolution {resolution} is not square, which PaliGemma requires")

    inputs = lerobot.get("input_features") or {}
    cameras = [key for key, feature in inputs.items() if feature.get("type") == "VISUAL"]
    empty = (f"observation.images.empty_camera_{i}" for i in range(lerobot.get("empty_cameras", 0)))
    cameras += [key for key in empty if key not in cameras]
    action = (lerobot.get("output_features") or {}).get("action")
    state = inputs.get("observation.state")

    kwargs: dict[str, Any] = {ours: lerobot[theirs] for theirs, ours in _RENAMED.items() if theirs in lerobot}
    kwargs.update(
        pi05=kind == "pi05",
        image_size=resolution[0],
        norm_mode=_norm_mode(lerobot.get("normalization_mapping") or {}, "QUANTILES" if kind == "pi05" else "MEAN_STD"),
        vlm_width=vlm["width"],
        vlm_depth=vlm["depth"],
        vlm_mlp_dim=vlm["mlp_dim"],
        expert_width=expert["width"],
        expert_depth=expert["depth"],
        expert_mlp_dim=expert["mlp_dim"],
        num_attention_heads=vlm["num_heads"],
        num_key_value_heads=vlm["num_kv_heads"],
        head_dim=vlm["head_dim"],
        action_dim=action["shape"][0] if action else lerobot.get("max_action_dim", 32),
        state_dim=state["shape"][0] if state else lerobot.get("max_state_dim", 32),
    )
    if lerobot.get("use_relative_actions"):
        kwargs["relative_action_mask"] = lerobot_relative_mask(lerobot, kwargs["action_dim"])
    if cameras:
        kwargs["camera_keys"] = cameras
    return kwargs


def lerobot_relative_mask(lerobot: dict[str, Any], action_dim: int) -> list[bool]:
    """The action dims LeRobot's ``RelativeActionsProcessorStep`` makes relative: all but those whose name (from
    ``action_feature_names``) contains a ``relative_exclude_joints`` entry (default: the gripper); all when the
    names were not recorded, as LeRobot does."""
    names = lerobot.get("action_feature_names")
    exclude = [str(token).lower() for token in lerobot.get("relative_exclude_joints", ["gripper"]) if token]
    if not names or not exclude:
        return [True] * action_dim
    mask = [not any(token in str(name).lower() for token in exclude) for name in names[:action_dim]]
    return mask + [True] * (action_dim - len(mask))


def read_lerobot_norm_stats(path: Any, **kwargs: Any) -> dict[str, Any] | None:
    """The normaliser statistics of a LeRobot folder as ``{LEROBOT_STATS_KEY: {"action", "proprio"}}``, or None."""
    download = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    pipeline = cached_file(path, "policy_preprocessor.json", _raise_exceptions_for_missing_entries=False, **download)
    if pipeline is None:
        return None
    with open(pipeline) as f:
        steps = json.load(f)["steps"]
    state_file = next((s.get("state_file") for s in steps if s.get("registry_name") == "normalizer_processor"), None)
    if state_file is None:
        return None
    tensors = load_file(cached_file(path, state_file, **download))
    entry: dict[str, Any] = {}
    for feature, ours in (("action", "action"), ("observation.state", "proprio")):
        stats = {name: tensors[f"{feature}.{name}"].tolist() for name in _STAT_NAMES if f"{feature}.{name}" in tensors}
        if stats:
            entry[ours] = stats
    if "action.count" in tensors:
        entry["num_transitions"] = int(tensors["action.count"].reshape(-1)[0])
    return {LEROBOT_STATS_KEY: entry} if entry else None
