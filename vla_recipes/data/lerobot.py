"""LeRobot datasets as VLA training samples: keys, cameras, action chunks, episode splits, stats.

A sample is a plain dict, the same for every model family (the collators turn it into model
inputs)::

    {"images": [float CHW in [0, 1], one per camera], "state": (state_dim,) or None,
     "actions": (action_horizon, action_dim), "action_is_pad": (action_horizon,), "task": str}

Action chunks come from LeRobot's ``delta_timestamps``: ``action_horizon`` future actions at the
dataset's fps; steps past the episode's end repeat its last action and are flagged in
``action_is_pad`` (losses leave them out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vla_recipes.configs import DataArguments, RecipeError, parse_episodes
from vla_recipes.data.normalize import check_stats

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def load_metadata(data_args: DataArguments):
    """The dataset's ``LeRobotDatasetMetadata`` (info, stats, episodes): cheap, no frames loaded."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    root = data_args.dataset_root
    if root is not None and not (Path(root) / "meta" / "info.json").is_file():
        raise RecipeError(
            f"dataset_root={root!r} holds no LeRobot dataset (no meta/info.json); "
            "point it at the dataset folder or drop it to download dataset_repo_id"
        )
    return LeRobotDatasetMetadata(data_args.dataset_repo_id, root=root, revision=data_args.dataset_revision)


def resolve_camera_keys(meta, data_args: DataArguments) -> list[str]:
    """Check that every requested feature exists (error lists what does) and return the cameras."""
    cameras = list(meta.camera_keys)
    camera_keys = data_args.camera_keys or cameras[:1]
    if not camera_keys:
        raise RecipeError(f"dataset {data_args.dataset_repo_id!r} has no camera feature; a VLA needs images")
    for key in camera_keys:
        if key not in cameras:
            raise RecipeError(f"camera_keys: {key!r} is not a camera of the dataset; it has {cameras}")
    others = [k for k in meta.features if k not in cameras]
    for name, key in (("state_key", data_args.state_key), ("action_key", data_args.action_key)):
        if key is not None and key not in meta.features:
            raise RecipeError(f"{name}: {key!r} is not a feature of the dataset; it has {others}")
    return camera_keys


def feature_dim(meta, key: str) -> int:
    return int(np.prod(meta.features[key]["shape"]))


def check_episodes(meta, name: str, episodes: list[int]) -> None:
    total = meta.total_episodes
    bad = [e for e in episodes if not 0 <= e < total]
    if bad:
        raise RecipeError(f"{name}: episodes {bad[:5]} do not exist; the dataset has episodes 0..{total - 1}")


def episode_split(meta, data_args: DataArguments) -> tuple[list[int], list[int] | None]:
    """Train and eval episode indices; train defaults to every episode not held out for eval."""
    total = meta.total_episodes
    eval_eps = parse_episodes(data_args.eval_episodes)
    train_eps = parse_episodes(data_args.train_episodes)
    if train_eps is None:
        train_eps = [e for e in range(total) if e not in set(eval_eps or [])]
    check_episodes(meta, "train_episodes", train_eps)
    check_episodes(meta, "eval_episodes", eval_eps or [])
    if not train_eps:
        raise RecipeError("train_episodes selects no episode")
    return train_eps, eval_eps


def dataset_norm_stats(meta, data_args: DataArguments, norm_mode: str, action_mask: list[bool] | None) -> dict:
    """The dataset's statistics in the ``config.norm_stats`` layout (see ``normalize``), checked for ``norm_mode``."""

    def feature_stats(key: str) -> dict:
        stats = meta.stats.get(key, {}) if meta.stats else {}
        out = {
            name: np.asarray(stats[name], dtype=np.float64).reshape(-1).tolist() for name in STAT_NAMES if name in stats
        }
        check_stats(out, norm_mode, key)
        return out

    entry: dict = {"action": feature_stats(data_args.action_key)}
    if action_mask is not None:
        dim = len(next(iter(entry["action"].values())))
        if len(action_mask) != dim:
            raise RecipeError(f"action_norm_mask has {len(action_mask)} entries but the action has {dim} dims")
        entry["action"]["mask"] = list(action_mask)
    if data_args.state_key is not None:
        entry["proprio"] = feature_stats(data_args.state_key)
    entry["num_transitions"] = int(meta.total_frames)
    entry["num_trajectories"] = int(meta.total_episodes)
    return {data_args.dataset_repo_id: entry}


def openvla_image_augmentation(height: int, width: int):
    """OpenVLA's training augmentation: a random 90%-area square crop resized back, then colour jitter."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop((height, width), scale=(0.9, 0.9), ratio=(1.0, 1.0), antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=0.05),
        ]
    )


class VLADataset(Dataset):
    """A ``LeRobotDataset`` restricted to some episodes, yielding the model-agnostic sample dict."""

    def __init__(
        self, meta, data_args: DataArguments, camera_keys: list[str], episodes: list[int], augment: bool = False
    ):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.camera_keys = camera_keys
        self.state_key = data_args.state_key
        self.action_key = data_args.action_key
        horizon = data_args.action_horizon
        transforms = None
        if augment:
            height, width = meta.features[camera_keys[0]]["shape"][:2]
            transforms = openvla_image_augmentation(height, width)
        self.dataset = LeRobotDataset(
            data_args.dataset_repo_id,
            root=data_args.dataset_root,
            revision=data_args.dataset_revision,
            episodes=episodes,
            delta_timestamps={self.action_key: [i / meta.fps for i in range(horizon)]},
            image_transforms=transforms,
            video_backend=data_args.video_backend,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        item = self.dataset[idx]
        actions = item[self.action_key]
        return {
            "images": [item[key] for key in self.camera_keys],
            "state": item[self.state_key] if self.state_key else None,
            "actions": actions,
            "action_is_pad": item.get(f"{self.action_key}_is_pad", torch.zeros(len(actions), dtype=torch.bool)),
            "task": item.get("task", ""),
        }
