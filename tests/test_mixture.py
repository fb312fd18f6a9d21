"""``datasets:``: weighted mixtures, drawn by weight, reproducibly, with per-dataset statistics and camera slots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli import DEMOS, load_script
from torch.utils.data import Dataset

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.mixture import WeightedMixture, entry_args


class Named(Dataset):
    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        assert 0 <= i < self.size
        return {"dataset": self.name, "index": i}


def draws(mixture: WeightedMixture) -> list[tuple[str, int]]:
    return [(s["dataset"], s["index"]) for s in (mixture[i] for i in range(len(mixture)))]


def test_drawn_proportions_follow_the_weights_and_resume_reproduces_them():
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    sizes = {"a": 100, "b": 4000, "c": 5900}  # 10k positions per epoch; sizes unlike the weights
    mixture = WeightedMixture({n: Named(n, sizes[n]) for n in weights}, weights, seed=3)
    first = draws(mixture)
    counts = {n: sum(d == n for d, _ in first) for n in weights}
    for name, weight in weights.items():
        p, n = weight / 10, len(first)
        assert abs(counts[name] / n - p) < 4 * np.sqrt(p * (1 - p) / n), counts  # 4 sigma of a binomial
    assert len({i for d, i in first if d == "a"}) > 90  # uniform within a dataset: nearly all of a's 100 samples
    resumed = WeightedMixture({n: Named(n, sizes[n]) for n in weights}, weights, seed=3)  # a new process
    assert draws(resumed) == first
    resumed.set_epoch(1)
    assert draws(resumed) != first
    mixture.set_epoch(1)
    assert draws(mixture) == draws(resumed)
    assert draws(WeightedMixture({n: Named(n, sizes[n]) for n in weights}, weights, seed=4)) != first


@pytest.mark.parametrize(
    ("datasets", "extra", "message"),
    [
        ([{"dataset_repo_id": "a/x", "weight": 0}], {}, r"datasets\[0\] \(a/x\): weight must be a number > 0, got 0"),
        ([{"dataset_repo_id": "a/x", "weight": -1.5}], {}, "weight must be a number > 0, got -1.5"),
        ([{"dataset_repo_id": "a/x"}, {"dataset_repo_id": "a/x"}], {}, r"datasets\[1\]: the name 'a/x' is taken"),
        ([{"dataset_repo_id": "a/x", "name": "n"}, {"dataset_repo_id": "a/y", "name": "n"}], {}, "name 'n' is taken"),
        ([{"dataset_repo_id": "a/x", "action_horizon": 5}], {}, r"action_horizon cannot be set per dataset"),
        ([{"weight": 1}], {}, r"datasets\[0\] needs a dataset_repo_id"),
        ([{"dataset_repo_id": "a/x"}], {"dataset_repo_id": "a/y"}, "either dataset_repo_id .* or datasets"),
        ([], {}, "datasets is empty"),
    ],
)
def test_bad_mixture_recipe_names_the_entry(datasets, extra, message):
    with pytest.raises(RecipeError, match=message):
        DataArguments(datasets=datasets, **extra)


def test_entries_take_the_shared_keys():
    args = DataArguments(
        datasets=[
            {"dataset_repo_id": "a/x", "weight": 2, "camera_keys": ["c"]},
            {"dataset_repo_id": "a/y", "name": "y"},
        ],
        action_horizon=5,
        state_indices=["0:3"],
    )
    entries = entry_args(args)
    assert list(entries) == ["a/x", "y"] and [w for w, _ in entries.values()] == [2.0, 1.0]
    x, y = entries["a/x"][1], entries["y"][1]
    assert (x.camera_keys, y.camera_keys, x.action_horizon, y.state_indices) == (["c"], None, 5, ["0:3"])
    assert x.datasets is None and y.dataset_repo_id == "a/y"


def recipe(tmp_path, dataset_root, two_camera_root, **overrides) -> str:
    values = {
        **DEMOS["pi05"],
        "dataset_repo_id": None,
        "dataset_root": None,
        "camera_keys": None,
        "train_episodes": None,
        "eval_episodes": None,
        "datasets": [
            {"dataset_repo_id": "local/synthetic_reach", "dataset_root": dataset_root, "name": "one_cam", "weight": 3},
            {
                "dataset_repo_id": "local/synthetic_reach_2cam",
                "dataset_root": two_camera_root,
                "name": "two_cam",
                "camera_keys": ["observation.images.image", "observation.images.wrist_image"],
                "train_episodes": ["0:3"],
                "eval_episodes": ["3:4"],
            },
        ],
        "action_horizon": 4,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
        "dataloader_num_workers": 0,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_sft_trains_a_mixture_with_per_dataset_statistics(tmp_path, dataset_root, two_camera_root, monkeypatch):
    from transformers import AutoModel, AutoProcessor

    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    sft = load_script("sft")
    sft.main(["--config", recipe(tmp_path, dataset_root, two_camera_root)])

    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["norm_stats"]) == ["one_cam", "two_cam"] and config["default_unnorm_key"] == "one_cam"
    assert config["camera_keys"] == ["observation.images.image", "observation.images.wrist_image"]  # the most cameras
    assert config["norm_stats"]["two_cam"]["num_trajectories"] == 3  # each over its own training episodes
    assert config["norm_stats"]["one_cam"]["num_trajectories"] == 6
    assert config["norm_stats"]["one_cam"]["action"]["q01"] != config["norm_stats"]["two_cam"]["action"]["q01"]
    card = (out / "README.md").read_text()
    assert "- local/synthetic_reach\n" in card and "- local/synthetic_reach_2cam\n" in card  # repo ids, not names
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses and all(np.isfinite(losses))

    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    state, noise = torch.rand(1, 8), torch.randn(1, 4, model.config.max_action_dim)
    one_camera = processor(images=[[torch.rand(3, 64, 64)]], text=["go"], state=state, unnorm_key="one_cam")
    assert one_camera["image_masks"].tolist() == [[True, False]]  # the missing wrist camera is masked
    default = model.predict_action(**one_camera, noise=noise)
    torch.testing.assert_close(default, model.predict_action(**one_camera, noise=noise, unnorm_key="one_cam"))
    other = model.predict_action(**one_camera, noise=noise, unnorm_key="two_cam")
    assert not torch.allclose(default, other)  # another dataset's statistics, other units


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"state_indices": ["0:2"]},
            "datasets: 'two_cam' has a 2-dim state ('observation.state') but 'one_cam' a 8-dim",
        ),
        (
            {"action_key": "observation.state", "state_key": None},
            "datasets: 'two_cam' has a 8-dim action ('observation.state') but",
        ),
        (
            {"tasks": ["pick the cube"]},
            "datasets: 'two_cam': tasks: 'pick the cube' matches no task of the dataset; it has 1 tasks",
        ),
    ],
)
def test_mixture_entries_that_do_not_fit_fail_before_the_weights(
    tmp_path, dataset_root, two_camera_root, monkeypatch, change, message
):
    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    sft = load_script("sft")
    monkeypatch.setattr("vla_recipes.pipeline.load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    path = recipe(tmp_path, dataset_root, two_camera_root)
    values = yaml.safe_load(Path(path).read_text())
    values["datasets"][1] |= change
    Path(path).write_text(yaml.safe_dump(values))
    with pytest.raises(RecipeError) as error:
        sft.main(["--config", path])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_resumed_mixture_run_draws_the_same_samples(tmp_path, dataset_root, two_camera_root, monkeypatch):
    """6 steps over 2 epochs of 32 draws, resumed from step 3: the same losses as the uninterrupted run (the
    mixture's draws, and each sample's noise, follow from the seed and the epoch)."""
    import shutil

    monkeypatch.setenv("VLA_RECIPES_CACHE", str(tmp_path / "cache"))
    sft = load_script("sft")
    overrides = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "relative_actions": True}

    def run(folder: str, *extra: str) -> dict[int, float]:
        path = recipe(tmp_path / folder, dataset_root, two_camera_root, **overrides)
        values = yaml.safe_load(Path(path).read_text())
        for entry in values["datasets"]:
            entry |= {"train_episodes": ["0:1"], "eval_episodes": None}  # 16 + 16 frames: 4 steps an epoch
        values["output_dir"] = str(tmp_path / folder / "out")
        Path(path).write_text(yaml.safe_dump(values))
        sft.main(["--config", path, *extra])
        history = json.loads((tmp_path / folder / "out" / "trainer_state.json").read_text())["log_history"]
        return {e["step"]: e["loss"] for e in history if "loss" in e}

    (tmp_path / "reference").mkdir()
    (tmp_path / "resumed").mkdir()
    reference = run("reference")
    checkpoint = shutil.copytree(tmp_path / "reference/out/checkpoint-3", tmp_path / "resumed/out/checkpoint-3")
    written = (checkpoint / "trainer_state.json").stat().st_mtime_ns
    resumed = run("resumed", "--resume_from_checkpoint", str(checkpoint))
    assert (checkpoint / "trainer_state.json").stat().st_mtime_ns == written  # continued from it, not retrained
    assert sorted(reference) == sorted(resumed) == list(range(1, 7)), (reference, resumed)  # 1-3: the checkpoint's
    assert all(abs(reference[s] - resumed[s]) <= 1e-6 for s in (4, 5, 6)), (reference, resumed)
