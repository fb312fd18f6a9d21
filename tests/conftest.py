"""Shared fixtures: a small synthetic LeRobot dataset written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> None:
    """Frame and statistics caches go to the session's temp folder, not the user's ~/.cache."""
    os.environ.setdefault("VLA_RECIPES_CACHE", str(tmp_path_factory.mktemp("vla_recipes_cache")))


NUM_EPISODES = 6
EPISODE_LENGTH = 16


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> str:
    """6 episodes x 16 frames, one 64x64 camera (``observation.images.image``)."""
    from vla_recipes.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic_reach"
    make_synthetic_dataset(root, num_episodes=NUM_EPISODES, episode_length=EPISODE_LENGTH, image_size=64)
    return str(root)


@pytest.fixture(scope="session")
def two_camera_root(tmp_path_factory) -> str:
    """Like ``dataset_root`` with a second, wrist camera (``observation.images.wrist_image``)."""
    from vla_recipes.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic_reach_2cam"
    make_synthetic_dataset(
        root,
        num_episodes=4,
        episode_length=EPISODE_LENGTH,
        image_size=64,
        cameras=("observation.images.image", "observation.images.wrist_image"),
    )
    return str(root)
