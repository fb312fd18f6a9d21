"""``state_indices``: the model sees a selection of the dataset's state dims, in samples, statistics and config."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from cli import DEMOS, load_script

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import VLADataset, dataset_norm_stats, load_metadata
from vla_recipes.data.state_selection import state_selection
from vla_recipes.data.synthetic import STATE_NAMES

SELECTED = ["6", "0:2"]  # gripper command, then x, y: order kept
INDICES = [6, 0, 1]


def data_args(root: str, **kw) -> DataArguments:
    return DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=root, **kw)


@pytest.fixture(scope="module")
def sft():
    return load_script("sft")


def test_sft_trains_on_the_selected_state(sft, tmp_path, dataset_root, monkeypatch):
    from transformers import AutoModel, AutoProcessor

    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    recipe = {
        **DEMOS["pi05"],
        "dataset_root": dataset_root,
        "camera_keys": ["observation.images.image"],
        "state_indices": SELECTED,
        "action_horizon": 4,
        "train_episodes": ["0:6"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 30,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "per_device_train_batch_size": 8,
        "logging_steps": 5,
        "dataloader_num_workers": 0,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    sft.main(["--config", str(path)])

    out = tmp_path / "out"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses  # 1.32 -> 1.06 here
    config = json.loads((out / "config.json").read_text())
    assert config["state_indices"] == INDICES and config["state_dim"] == len(INDICES)
    assert "state_indices" in (out / "README.md").read_text()

    # The run's proprio statistics are the full state's, sliced (the same episodes, from the same cache).
    proprio = config["norm_stats"]["local/synthetic_reach"]["proprio"]
    meta = load_metadata(data_args(dataset_root))
    full = dataset_norm_stats(meta, data_args(dataset_root), "quantiles", None, list(range(6)))
    full = full["local/synthetic_reach"]["proprio"]
    assert set(proprio) == set(full) and len(full["q99"]) == len(STATE_NAMES)
    for name, values in proprio.items():
        assert values == [full[name][i] for i in INDICES], name

    # The reloaded policy takes the selected state (3 dims), as the config says.
    model, processor = AutoModel.from_pretrained(out), AutoProcessor.from_pretrained(out)
    inputs = processor(images=[[torch.rand(3, 64, 64)]] * 2, text=["go"] * 2, state=torch.rand(2, len(INDICES)))
    assert model.predict_action(**inputs).shape == (2, 4, 7)


@pytest.mark.parametrize("frame_cache", [True, False], ids=["frame_cache", "lerobot"])
def test_dataset_yields_the_selected_state(dataset_root, tmp_path, frame_cache):
    cache = {"frame_cache": frame_cache, "frame_cache_dir": str(tmp_path / "frames")}
    full_args, args = data_args(dataset_root, **cache), data_args(dataset_root, state_indices=SELECTED, **cache)
    meta = load_metadata(args)
    cameras = ["observation.images.image"]
    full, selected = VLADataset(meta, full_args, cameras, [1]), VLADataset(meta, args, cameras, [1])
    for i in (0, 7):
        assert full[i]["state"].shape == (len(STATE_NAMES),)
        torch.testing.assert_close(selected[i]["state"], full[i]["state"][INDICES], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"state_indices": ["0:9"]}, r"state_indices: \[8\] out of range: .*'observation.state' has 8 dims"),
        ({"state_indices": ["-1"]}, r"state_indices: \[-1\] out of range: .* has 8 dims"),
        ({"state_indices": ["a:b"]}, r"state_indices: 'a:b' is not an index or a 'start:stop' range"),
        ({"state_indices": ["0:3", "2"]}, r"state_indices selects dims \[2\] more than once"),
        ({"state_indices": ["3:3"]}, "state_indices selects no dim"),
        ({"state_indices": ["0"], "state_key": None}, "state_indices selects dims of the state, but state_key is None"),
    ],
)
def test_bad_state_indices_name_the_key(dataset_root, overrides, message):
    args = data_args(dataset_root, **overrides)
    meta = load_metadata(args)
    with pytest.raises(RecipeError, match=message):
        state_selection(meta, args)
    with pytest.raises(RecipeError, match=message):  # the statistics use the same check
        dataset_norm_stats(meta, args, "mean_std", None)
