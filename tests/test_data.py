"""LeRobot data: samples, action chunks and padding, episode splits, feature errors, norm stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import EPISODE_LENGTH, NUM_EPISODES

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import VLADataset, dataset_norm_stats, episode_split, load_metadata, resolve_camera_keys
from vla_recipes.data.synthetic import ACTION_NAMES, STATE_NAMES


def data_args(root: str, **kw) -> DataArguments:
    return DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=root, **kw)


def recorded_actions(root: str) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((Path(root) / "data").rglob("*.parquet")))


def test_sample_and_action_chunk(dataset_root):
    args = data_args(dataset_root, action_horizon=4)
    meta = load_metadata(args)
    cams = resolve_camera_keys(meta, args)
    assert cams == ["observation.images.image"]  # default: the first camera
    ds = VLADataset(meta, args, cams, episodes=[1, 2])
    assert len(ds) == 2 * EPISODE_LENGTH
    frames = recorded_actions(dataset_root)
    ep1 = np.stack(frames[frames.episode_index == 1].sort_values("frame_index")["action"].to_numpy())

    first = ds[0]
    assert first["images"][0].shape == (3, 64, 64) and first["images"][0].dtype == torch.float32
    assert first["state"].shape == (len(STATE_NAMES),)
    assert first["task"] == "move the gripper to the red cube"
    np.testing.assert_allclose(first["actions"].numpy(), ep1[:4], atol=1e-6)
    assert not first["action_is_pad"].any()

    last = ds[EPISODE_LENGTH - 2]  # two real steps left in episode 1, then padding
    assert last["actions"].shape == (4, len(ACTION_NAMES))
    assert last["action_is_pad"].tolist() == [False, False, True, True]
    np.testing.assert_allclose(last["actions"][:2].numpy(), ep1[-2:], atol=1e-6)


def test_images_show_the_scene(dataset_root):
    """The learnable signal survives video encoding: a red cube and a blue gripper are visible."""
    args = data_args(dataset_root)
    meta = load_metadata(args)
    image = VLADataset(meta, args, ["observation.images.image"], episodes=[0])[0]["images"][0]
    red = (image[0] > 0.7) & (image[1] < 0.3) & (image[2] < 0.3)
    blue = (image[2] > 0.7) & (image[0] < 0.3)
    assert red.sum() > 10 and blue.sum() > 2


def test_episode_split(dataset_root):
    meta = load_metadata(data_args(dataset_root))
    train, evaluation = episode_split(meta, data_args(dataset_root, eval_episodes=["4:6"]))
    assert train == [0, 1, 2, 3] and evaluation == [4, 5]
    with pytest.raises(RecipeError, match=r"episodes \[9\] do not exist; the dataset has episodes 0..5"):
        episode_split(meta, data_args(dataset_root, train_episodes=["9"]))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"camera_keys": ["observation.images.top"]}, "camera_keys: 'observation.images.top' is not a camera"),
        ({"state_key": "observation.joints"}, "state_key: 'observation.joints' is not a feature"),
        ({"action_key": "actions"}, "action_key: 'actions' is not a feature of the dataset; it has"),
    ],
)
def test_missing_feature_is_named_with_alternatives(dataset_root, kw, message):
    args = data_args(dataset_root, **kw)
    with pytest.raises(RecipeError) as e:
        resolve_camera_keys(load_metadata(args), args)
    assert message in str(e.value)
    assert "observation.images.image" in str(e.value) or "observation.state" in str(e.value)


def test_missing_dataset_root_is_named(tmp_path):
    with pytest.raises(RecipeError, match="no LeRobot dataset"):
        load_metadata(data_args(str(tmp_path / "nowhere")))


def test_norm_stats_layout(dataset_root):
    args = data_args(dataset_root)
    meta = load_metadata(args)
    stats = dataset_norm_stats(meta, args, "bounds_q99", [True] * 6 + [False])
    entry = stats["local/synthetic_reach"]
    assert entry["action"]["mask"] == [True] * 6 + [False]
    assert set(entry["action"]) >= {"mean", "std", "min", "max", "q01", "q99"}
    assert len(entry["proprio"]["q01"]) == len(STATE_NAMES)
    assert entry["num_transitions"] == NUM_EPISODES * EPISODE_LENGTH
    assert entry["num_trajectories"] == NUM_EPISODES
    np.testing.assert_allclose(entry["action"]["max"], meta.stats["action"]["max"])
    with pytest.raises(RecipeError, match="action_norm_mask has 2 entries but the action has 7 dims"):
        dataset_norm_stats(meta, args, "bounds_q99", [True, False])
