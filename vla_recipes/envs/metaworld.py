"""LeRobot's MetaWorld env rendered at the size a policy reads, its scripted experts and a random baseline.

LeRobot's ``metaworld`` env (``lerobot.envs.metaworld.MetaworldEnv``) always renders 480x480, whatever
``observation_width``/``observation_height`` say, and ignores its config's ``episode_length`` (every episode may run
MetaWorld's 500 steps). On a CPU the software renderer then dominates everything: 0.18 s a frame at 480x480, so
100 demonstrations take 15 minutes and 50 failed evaluation episodes two hours. The ``metaworld_sized`` env type
registered here is LeRobot's env with those two fields honoured: the camera renders ``image_size`` pixels square
(the model's own size, so its processor's resize is a no-op and collection and rollout see the very same pixels)
and an episode is cut at ``episode_length`` steps. Its lights cast no shadows: with MuJoCo's 4096-pixel shadow
map a software renderer spends four fifths of a frame on them (0.11 s against 0.025 s of CPU at 128x128).
Each frame is rendered after an ``mj_forward``: MetaWorld's reset moves reach-v3's goal site (and drawer-open-v3's
drawer) after its last one, so LeRobot's first frame of an episode draws them where they are not, and a policy's first
chunk acts on that. Everything else (MT1 task, ``corner2`` camera and its flip, seeded goal positions, the 4-dim
state and action) is LeRobot's code.

One camera cannot place a point in 3-D: reach-v3's goal is drawn in a box, and from ``corner2`` alone a goal near
the camera and one further along the same ray look alike (without shadows nothing else tells them apart). So the
env can render more of MetaWorld's cameras (``cameras: [corner2, topview]``); the first is LeRobot's camera and
stays ``observation.image`` when it is the only one, several become ``observation.images.<camera>`` as LeRobot's
``preprocess_observation`` names a dict of pixels.

    python recipes/rollout.py --model outputs/demo-sim-pi05 --env metaworld_sized \\
        --env_kwargs '{"task": "reach-v3", "image_size": 112}' --n_episodes 50

Importing this module registers the env type; ``lerobot.envs.metaworld`` (and so ``metaworld`` and ``mujoco``) is
imported only when envs are built (``pip install -e '.[sim]'``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from vla_recipes.configs import RecipeError

ENV_TYPE = "metaworld_sized"
# Evaluation uses seeds [0, COLLECTION_SEED_START) (recipes/rollout.py starts at 0); collection starts here, so a
# policy is never scored on a goal position it was shown.
COLLECTION_SEED_START = 100_000
CAMERAS = ("corner2", "topview", "corner", "corner3", "behindGripper", "gripperPOV")  # MetaWorld's, LeRobot's first


def check_renderer() -> None:
    """Fail in one line, before any env is built, where MuJoCo has nothing to render with."""
    if not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
        raise RecipeError("MuJoCo has no display to render MetaWorld's camera: set MUJOCO_GL=egl (or osmesa)")


def task_names() -> list[str]:
    """Every MetaWorld task LeRobot's wrapper knows (with a task description and a scripted expert)."""
    from lerobot.envs.metaworld import TASK_POLICY_MAPPING

    return sorted(TASK_POLICY_MAPPING)


def check_task(task: str) -> None:
    try:
        importlib.import_module("lerobot.envs.metaworld")
    except ModuleNotFoundError as e:
        raise RecipeError(f"MetaWorld is not installed ({e}): pip install -e '.[sim]'") from None
    names = task_names()
    if task not in names:
        raise RecipeError(f"unknown MetaWorld task {task!r}; valid tasks: {', '.join(names)}")


def check_cameras(cameras: list[str]) -> None:
    if not cameras or len(set(cameras)) != len(cameras) or not set(cameras) <= set(CAMERAS):
        raise RecipeError(f"cameras must be distinct MetaWorld cameras among {list(CAMERAS)}, not {cameras}")


def sized_env(
    task: str, image_size: int, episode_length: int, cameras: tuple[str, ...] = ("corner2",), **gym_kwargs: Any
):
    """One LeRobot ``MetaworldEnv`` whose cameras render ``image_size`` pixels square, cut at ``episode_length``.

    The first camera is LeRobot's own (``camera_name``, with its flip for ``corner2``); further cameras are rendered
    by MuJoCo's ``Renderer`` from the same simulator state, and ``pixels`` becomes a dict keyed by camera name."""
    from gymnasium import spaces
    from lerobot.envs.metaworld import MetaworldEnv

    class SizedMetaworldEnv(MetaworldEnv):
        _extra_renderer = None  # MuJoCo's Renderer for the cameras after the first, made at their first frame

        def _ensure_env(self) -> None:
            created = self._env is None
            super()._ensure_env()
            if created:  # the offscreen viewer is made at the first render, at the renderer's size
                renderer = self._env.mujoco_renderer
                renderer.width, renderer.height = self.observation_width, self.observation_height
                self._env.model.light_castshadow[:] = 0  # a software renderer spends 4/5 of a frame on shadows

        def _format_raw_obs(self, raw_obs: np.ndarray) -> dict:
            import mujoco

            # MetaWorld's reset_model moves sites (reach-v3's goal) after its last mj_forward: the first frame of an
            # episode showed the goal somewhere else. Recomputing positions fixes it and changes nothing after a step.
            mujoco.mj_forward(self._env.model, self._env.data)
            obs = super()._format_raw_obs(raw_obs)
            if len(cameras) > 1:
                obs["pixels"] = {cameras[0]: obs["pixels"]} | {cam: self._render(cam) for cam in cameras[1:]}
            return obs

        def _render(self, camera: str) -> np.ndarray:
            import mujoco

            if self._extra_renderer is None:
                self._extra_renderer = mujoco.Renderer(self._env.model, self.observation_height, self.observation_width)
            self._extra_renderer.update_scene(self._env.data, camera=camera)
            return self._extra_renderer.render()

        def close(self) -> None:
            if self._extra_renderer is not None:
                self._extra_renderer.close()
            super().close()

    env = SizedMetaworldEnv(
        task, camera_name=cameras[0], observation_width=image_size, observation_height=image_size, **gym_kwargs
    )
    if len(cameras) > 1:
        image = spaces.Box(low=0, high=255, shape=(image_size, image_size, 3), dtype=np.uint8)
        env.observation_space = spaces.Dict(
            {"pixels": spaces.Dict({cam: image for cam in cameras}), "agent_pos": env.observation_space["agent_pos"]}
        )
    env._max_episode_steps = episode_length  # what LeRobot's eval loop reads as the time limit
    return env


@EnvConfig.register_subclass(ENV_TYPE)
@dataclass
class MetaworldSizedEnv(EnvConfig):
    """LeRobot's ``metaworld`` env config, with the camera size and episode length it declares honoured."""

    task: str = "reach-v3"
    fps: int = 80
    episode_length: int = 400
    image_size: int = 112
    cameras: list[str] = field(default_factory=lambda: ["corner2"])
    obs_type: str = "pixels_agent_pos"
    render_mode: str = "rgb_array"
    features: dict[str, PolicyFeature] = field(default_factory=dict)
    features_map: dict[str, str] = field(
        default_factory=lambda: {"action": ACTION, "agent_pos": OBS_STATE, "pixels/top": OBS_IMAGE}
    )

    def __post_init__(self) -> None:
        if self.obs_type != "pixels_agent_pos":
            raise ValueError(f"obs_type must be 'pixels_agent_pos' (camera and state), not {self.obs_type!r}")
        check_cameras(self.cameras)
        image = PolicyFeature(type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3))
        self.features = {
            "action": PolicyFeature(type=FeatureType.ACTION, shape=(4,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(4,)),
        }
        if len(self.cameras) == 1:
            self.features["pixels/top"] = image
        else:
            self.features |= {f"pixels/{cam}": image for cam in self.cameras}
            self.features_map |= {f"pixels/{cam}": f"{OBS_IMAGES}.{cam}" for cam in self.cameras}

    @property
    def gym_kwargs(self) -> dict:
        return {"obs_type": self.obs_type, "render_mode": self.render_mode}

    def create_envs(self, n_envs: int, use_async_envs: bool = False) -> dict:
        """``{task: {0: VectorEnv}}`` as LeRobot's ``make_env`` returns (one task per config)."""
        import gymnasium as gym

        check_renderer()
        check_task(self.task)
        vector_cls = gym.vector.AsyncVectorEnv if use_async_envs else gym.vector.SyncVectorEnv
        factory = [
            lambda: sized_env(self.task, self.image_size, self.episode_length, tuple(self.cameras), **self.gym_kwargs)
        ] * n_envs  # fmt: skip
        return {self.task: {0: vector_cls(factory)}}


def expert_action(env) -> np.ndarray:
    """The task's scripted expert (``metaworld.policies``) on the full simulator state, clipped to the action box.

    The expert reads MetaWorld's 39-dim observation (object and goal positions), which LeRobot's wrapper does not
    pass on, so it is read from the wrapped MetaWorld env (``_get_obs`` is idempotent between steps)."""
    action = env.expert_policy.get_action(env._env._get_obs())
    return np.clip(action, env.action_space.low, env.action_space.high).astype(np.float32)


class ScriptedPolicy(torch.nn.Module):
    """A baseline for ``recipes/rollout.py --baseline``: the scripted expert or uniform random actions, driven by
    LeRobot's own ``eval_policy`` on the same seeds as a model (registered as a ``PreTrainedPolicy`` there)."""

    def __init__(self, kind: str, vector_env, seed: int = 0) -> None:
        super().__init__()
        if kind not in ("expert", "random"):
            raise ValueError(f"baseline must be 'expert' or 'random', not {kind!r}")
        if kind == "expert" and not hasattr(vector_env, "envs"):
            raise ValueError("the expert baseline reads the simulator state: it needs a SyncVectorEnv")
        self.kind, self.vector_env = kind, vector_env
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def select_action(self, observation: dict) -> torch.Tensor:
        space = self.vector_env.single_action_space
        if self.kind == "random":
            actions = self.rng.uniform(space.low, space.high, (self.vector_env.num_envs, *space.shape))
        else:
            actions = np.stack([expert_action(env) for env in self.vector_env.envs])
        return torch.from_numpy(actions.astype(np.float32))
