"""Demonstrations from a simulator's scripted expert, written as a LeRobot v3.0 dataset.

    MUJOCO_GL=egl python -m vla_recipes.data.collect --env metaworld --task reach-v3 --episodes 100 \\
        --root data/mw_reach --image_size 112

The expert acts in the env ``recipes/rollout.py`` evaluates in (:mod:`vla_recipes.envs.metaworld`: LeRobot's
MetaWorld wrapper, rendered at ``--image_size``) and every observation goes through LeRobot's own
``preprocess_observation`` and the env's processor, as in ``eval_policy``: the frames, states and actions a
policy trains on are the ones it meets in closed loop (same camera, orientation, resolution, state layout and
action scale). Images are stored losslessly (PNG in the parquet files), so they are bit-identical too.

Only successful episodes are kept (the dropped ones are counted); each episode's task prompt is the env's task
description. Episode ``i`` is seeded ``--seed + i`` (failed seeds are skipped), from ``COLLECTION_SEED_START``
(100000) up, while evaluation seeds run from 0: no goal position a policy was trained on is scored. An episode ends
at its success unless ``--steps_after_success`` records the expert's next steps too: cut at success, the data never
shows a hand at (or past) the goal, so a policy that misses the success radius has never seen anyone stop.

The dataset is written to ``<root>.partial`` and renamed to ``<root>`` once finalised: an interrupted run leaves
no folder that looks complete (the next run starts over). A finished one is reused only when ``meta/collection.json``
says it was collected with the same env settings and episode count by a collector that writes what this one does;
otherwise the run stops and says why, rather than train on other data than asked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from vla_recipes.configs import RecipeError

EXPERT_ENVS = ("metaworld",)  # the envs that ship a scripted expert
# What changed in what the collector writes, by version: a dataset written before a change is not reused.
COLLECTOR_CHANGES = {
    2: "the first frame is rendered after the reset's positions are computed (it showed reach-v3's goal and "
    "drawer-open-v3's drawer where the previous episode left them)",
}
COLLECTOR_VERSION = max(COLLECTOR_CHANGES)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    from vla_recipes.envs.metaworld import COLLECTION_SEED_START

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="metaworld", choices=EXPERT_ENVS)
    parser.add_argument("--task", default="reach-v3", help="A MetaWorld task, e.g. reach-v3, drawer-open-v3.")
    parser.add_argument("--episodes", type=int, default=100, help="Successful episodes to keep.")
    parser.add_argument("--root", required=True, help="Dataset folder to create.")
    parser.add_argument("--repo_id", default=None, help="Dataset name (default: local/<root folder name>).")
    parser.add_argument("--image_size", type=int, default=112, help="Camera size (square), the model's image_size.")
    parser.add_argument(
        "--cameras", nargs="+", default=["corner2"], help="MetaWorld cameras to record (corner2, topview, ...)."
    )
    parser.add_argument("--episode_length", type=int, default=400, help="Steps after which an episode has failed.")
    parser.add_argument(
        "--steps_after_success", type=int, default=0,
        help="Expert steps recorded after an episode's success: the policy also sees the expert stop at the goal.",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=COLLECTION_SEED_START, help="Seed of the first episode.")
    parser.add_argument("--max_attempts", type=int, default=None, help="Episodes tried at most (default: 2x + 10).")
    cli = parser.parse_args(args)
    if cli.seed < COLLECTION_SEED_START:
        parser.error(f"--seed must be >= {COLLECTION_SEED_START}: seeds below it are evaluation seeds")
    if cli.episodes < 1:
        parser.error("--episodes must be >= 1")
    if cli.steps_after_success < 0:
        parser.error("--steps_after_success must be >= 0")
    return cli


def dataset_features(env_cfg) -> dict:
    """LeRobot features of a MetaWorld dataset: the env's cameras (lossless images), 4-dim state and action."""
    from lerobot.utils.constants import ACTION, OBS_STATE

    from vla_recipes.envs import env_camera_keys

    size = env_cfg.image_size
    image = {"dtype": "image", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
    return {key: image for key in env_camera_keys(env_cfg)} | {
        OBS_STATE: {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper_distance"]},
        ACTION: {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "grip_effort"]},
    }


def policy_observation(raw_observation: dict, env_preprocessor) -> dict:
    """An env observation as ``eval_policy`` hands it to a policy (LeRobot's preprocessing, then the env's)."""
    from lerobot.envs.utils import preprocess_observation

    return env_preprocessor(preprocess_observation(raw_observation))


def as_frame(observation: dict, action: np.ndarray, cameras: list[str]) -> dict:
    """One dataset frame from a (batch-of-one) policy observation: each image back to the uint8 HWC it was."""
    from lerobot.utils.constants import ACTION, OBS_STATE

    images = {key: (observation[key][0] * 255).round().byte().permute(1, 2, 0).numpy() for key in cameras}
    return images | {OBS_STATE: observation[OBS_STATE][0].numpy().astype(np.float32), ACTION: action}


def batch_of_one(observation: dict) -> dict:
    """A single env's observation as its vector env returns it (a leading batch axis of one)."""
    return {k: batch_of_one(v) if isinstance(v, dict) else np.asarray(v)[None] for k, v in observation.items()}


def expert_episode(
    vector_env, env_preprocessor, seed: int, max_steps: int, cameras: list[str], steps_after_success: int = 0
) -> tuple[list[dict], bool]:
    """Roll the scripted expert out from ``seed``: the frames up to the step that succeeded (and the expert's next
    ``steps_after_success``, which show it holding at the goal), and whether it succeeded."""
    from vla_recipes.envs.metaworld import expert_action

    raw, _ = vector_env.reset(seed=[seed])
    env = vector_env.envs[0]
    frames = []
    for _ in range(max_steps):
        action = expert_action(env)
        frames.append(as_frame(policy_observation(raw, env_preprocessor), action, cameras))
        raw, _, terminated, truncated, info = vector_env.step(action[None])
        if bool(info["is_success"][0]):
            break
        if terminated[0] or truncated[0]:
            return frames, False
    else:
        return frames, False
    for _ in range(steps_after_success):  # the vector env would reset the finished episode: step its env directly
        action = expert_action(env)
        frames.append(as_frame(policy_observation(raw, env_preprocessor), action, cameras))
        observation, _, _, truncated, _ = env.step(action)
        raw = batch_of_one(observation)
        if truncated:
            break
    return frames, True


def check_reusable(root: Path, env_kwargs: dict, episodes: int, steps_after_success: int) -> None:
    """Stop unless the finished dataset in ``root`` is what this run would collect (see the module docstring)."""
    record_file = root / "meta" / "collection.json"
    if not record_file.is_file():
        raise RecipeError(f"--root {root} holds a LeRobot dataset this collector did not write (no {record_file})")
    record = json.loads(record_file.read_text())
    version = record.get("collector_version", 1)
    if version < COLLECTOR_VERSION:
        changes = "; ".join(change for after, change in COLLECTOR_CHANGES.items() if after > version)
        raise RecipeError(
            f"{root} was written by collector version {version}, and since then {changes}: delete it to collect again"
        )
    settings = {"episodes": len(record["seeds"]), "steps_after_success": record.get("steps_after_success", 0)}
    settings |= record["env_kwargs"]
    asked = {"episodes": episodes, "steps_after_success": steps_after_success} | env_kwargs
    differ = [
        f"{key}={settings.get(key)!r} (asked {value!r})" for key, value in asked.items() if settings.get(key) != value
    ]
    if differ:
        raise RecipeError(f"{root} was collected with {', '.join(differ)}; delete it or pick another --root")


def collect(cli: argparse.Namespace) -> Path:
    """Collect ``cli.episodes`` successful expert episodes into ``cli.root``; returns the dataset folder."""
    from lerobot.datasets import LeRobotDataset
    from lerobot.envs import make_env, make_env_config, make_env_pre_post_processors
    from tqdm import tqdm

    from vla_recipes.envs import env_camera_keys
    from vla_recipes.envs.metaworld import ENV_TYPE, check_renderer, check_task

    root = Path(cli.root)
    env_kwargs = {
        "task": cli.task, "image_size": cli.image_size, "episode_length": cli.episode_length, "cameras": cli.cameras
    }  # fmt: skip
    if (root / "meta" / "info.json").is_file():
        check_reusable(root, env_kwargs, cli.episodes, cli.steps_after_success)
        print(f"{root} already holds this collection: reusing it (delete it to collect again)")
        return root
    if root.exists():
        raise RecipeError(f"--root {root} exists but is not a LeRobot dataset; pick another folder or delete it")
    check_renderer()
    check_task(cli.task)
    env_cfg = make_env_config(ENV_TYPE, **env_kwargs)
    vector_env = make_env(env_cfg, n_envs=1)[cli.task][0]
    env_preprocessor, _ = make_env_pre_post_processors(env_cfg, None)
    task = vector_env.envs[0].task_description
    cameras = env_camera_keys(env_cfg)

    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    repo_id = cli.repo_id or f"local/{root.name}"
    dataset = LeRobotDataset.create(
        repo_id, fps=env_cfg.fps, features=dataset_features(env_cfg), root=partial, use_videos=False,
        robot_type="sawyer", image_writer_threads=2,
    )  # fmt: skip
    max_attempts = cli.max_attempts or 2 * cli.episodes + 10
    seeds, dropped = [], []
    with tqdm(total=cli.episodes, desc=f"{cli.task} expert episodes", unit="ep") as progress:
        for seed in range(cli.seed, cli.seed + max_attempts):
            frames, success = expert_episode(
                vector_env, env_preprocessor, seed, cli.episode_length, cameras, cli.steps_after_success
            )
            if not success:
                dropped.append(seed)
                progress.set_postfix(dropped=len(dropped))
                continue
            for frame in frames:
                dataset.add_frame(frame | {"task": task})
            dataset.save_episode()
            seeds.append(seed)
            progress.update()
            if len(seeds) == cli.episodes:
                break
    vector_env.close()
    dataset.finalize()
    if len(seeds) < cli.episodes:
        shutil.rmtree(partial)
        raise RecipeError(
            f"the {cli.task} expert succeeded in {len(seeds)} of {max_attempts} episodes, fewer than --episodes "
            f"{cli.episodes}; raise --max_attempts or --episode_length"
        )
    record = {
        "collector_version": COLLECTOR_VERSION,
        "env": ENV_TYPE,
        "env_kwargs": env_kwargs,
        "steps_after_success": cli.steps_after_success,
        "task_description": task,
        "seeds": seeds,
        "dropped_seeds": dropped,
        "expert_success_rate": len(seeds) / (len(seeds) + len(dropped)),
    }
    (partial / "meta" / "collection.json").write_text(json.dumps(record, indent=2))
    partial.rename(root)
    print(
        f"wrote {root}: {len(seeds)} episodes ({dataset.meta.total_frames} frames) of {task!r}, seeds "
        f"{seeds[0]}..{seeds[-1]}; dropped {len(dropped)} failed expert episode(s)"
    )
    return root


def main(args: list[str] | None = None) -> Path:
    return collect(parse_args(args))


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        sys.exit(f"error: {e}")
