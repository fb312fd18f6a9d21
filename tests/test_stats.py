"""Normalisation statistics the dataset lacks: computed from its parquet data, cached, given, or refused clearly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli import ROOT, accelerate_launch, run

from vla_recipes.configs import DataArguments, RecipeError
from vla_recipes.data.lerobot import dataset_norm_stats, load_metadata
from vla_recipes.data.stats import HistogramStats, compute_stats, norm_stats_entry

REPO = "local/synthetic_reach"
TRAIN = [0, 1, 2, 3]  # of the 6 episodes of conftest's dataset
QUANTILE_NAMES = ("q01", "q10", "q50", "q90", "q99")


def data_args(root, **kw) -> DataArguments:
    return DataArguments(dataset_repo_id=REPO, dataset_root=str(root), **kw)


def frames(root, key: str, episodes: list[int]) -> np.ndarray:
    """``key`` of every frame of ``episodes``, read independently of the code under test."""
    df = pd.concat(pd.read_parquet(p) for p in sorted((Path(root) / "data").rglob("*.parquet")))
    return np.stack(df[df.episode_index.isin(episodes)][key].to_numpy()).astype(np.float64)


def numpy_quantiles(root, key: str, episodes: list[int]) -> dict[str, np.ndarray]:
    q01, q99 = np.quantile(frames(root, key, episodes), [0.01, 0.99], axis=0)
    return {"q01": q01, "q99": q99}


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a dataset (tests below edit it); ``quantiles=False`` strips q01..q99 from its stats.json,
    as in every dataset converted from LeRobot v2.1."""

    def make(root: str, quantiles: bool = True) -> Path:
        out = tmp_path / "dataset"
        shutil.copytree(root, out)
        if not quantiles:
            path = out / "meta" / "stats.json"
            stats = json.loads(path.read_text())
            path.write_text(
                json.dumps({k: {s: v for s, v in f.items() if s not in QUANTILE_NAMES} for k, f in stats.items()})
            )
        return out

    return make


def test_histogram_error_within_its_bound():
    """Heavy tails, a far outlier, a two-valued gripper, a constant and a skewed dim: every streamed quantile is
    within the bound it reports, which is within (max - min) / bins**2; at 16 bins it is not exact."""
    rng = np.random.default_rng(0)
    n = 50_000
    x = np.stack(
        [
            rng.standard_t(2, n),
            np.r_[rng.normal(size=n - 1), 1e4],
            rng.choice([-1.0, 1.0], n, p=[0.3, 0.7]),
            np.full(n, 0.1),
            rng.exponential(size=n),
        ],
        axis=1,
    ).astype(np.float32)
    exact = np.quantile(x.astype(np.float64), [0.01, 0.99], axis=0)
    span = x.max(axis=0).astype(np.float64) - x.min(axis=0)
    for bins in (16, 256):
        batches = lambda: (x[i : i + 4096] for i in range(0, n, 4096))  # noqa: E731
        accumulator = HistogramStats(5, bins)
        stats, how = compute_stats(batches, accumulator)
        _, bounds = accumulator.result()
        errors = np.abs(np.array([stats["q01"], stats["q99"]]) - exact)
        bound = np.array([bounds["q01"], bounds["q99"]])
        assert (errors <= bound + 1e-12 * span).all(), (bins, errors, bound)
        assert (bound <= span / bins**2 * (1 + 1e-9)).all(), (bins, bound, span / bins**2)
        assert (errors[:, 2:4] == 0).all() and (bound[:, 2:4] == 0).all()  # gripper and constant: exact
        assert how["method"] == f"histogram ({bins} bins)"
        np.testing.assert_allclose(stats["mean"], x.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats["std"], x.astype(np.float64).std(axis=0), rtol=1e-9)
        assert stats["min"] == x.min(axis=0).tolist() and stats["max"] == x.max(axis=0).tolist()
        if bins == 16:
            assert errors.max() > 0  # an approximation at this resolution, so the bound check above can fail


def test_quantiles_of_the_training_episodes_exact_or_streamed(dataset_root, tmp_path, caplog):
    """LeRobot's stored q01/q99 (means of per-episode quantiles) are replaced by numpy's over the training frames;
    with no memory budget the streamed estimate stays within (max - min) / bins**2."""
    meta = load_metadata(data_args(dataset_root))
    expected = numpy_quantiles(dataset_root, "action", TRAIN)
    with caplog.at_level(logging.INFO, logger="vla_recipes.stats"):
        entry = norm_stats_entry(meta, data_args(dataset_root, stats_cache_dir=str(tmp_path)), "quantiles", TRAIN)
    assert entry["action"]["q01"] == expected["q01"].tolist() and entry["action"]["q99"] == expected["q99"].tolist()
    assert not np.allclose(entry["action"]["q01"], meta.stats["action"]["q01"])
    assert entry["num_trajectories"] == 4 and entry["num_transitions"] == 4 * 16
    assert "mean of per-episode quantiles" in caplog.text and "the run trains on 4 of 6 episodes" in caplog.text

    args = data_args(dataset_root, stats_cache_dir=str(tmp_path / "streamed"))
    with caplog.at_level(logging.INFO, logger="vla_recipes.stats"):
        streamed = norm_stats_entry(meta, args, "quantiles", TRAIN, memory_budget=0, bins=8)["action"]
    span = np.array(entry["action"]["max"]) - entry["action"]["min"]
    for name in ("q01", "q99"):
        assert np.all(np.abs(np.array(streamed[name]) - expected[name]) <= span / 64 + 1e-12)
    assert "histogram (8 bins)" in caplog.text


def test_stored_stats_are_used_when_they_serve(dataset_root, tmp_path):
    """mean_std over every episode: the dataset's meta/stats.json is exact for it, so nothing is computed."""
    args = data_args(dataset_root, stats_cache_dir=str(tmp_path / "cache"))
    meta = load_metadata(args)
    entry = norm_stats_entry(meta, args, "mean_std")
    assert entry["action"]["std"] == np.asarray(meta.stats["action"]["std"], dtype=np.float64).tolist()
    assert not (tmp_path / "cache").exists()


def test_cache_is_per_feature_and_invalidated_by_a_data_file_change(dataset_root, copy_of, tmp_path, caplog):
    root = copy_of(dataset_root)
    cache = tmp_path / "cache"
    args = data_args(root, stats_cache_dir=str(cache))
    meta = load_metadata(args)
    with caplog.at_level(logging.INFO, logger="vla_recipes.stats"):
        first = norm_stats_entry(meta, args, "bounds_q99", TRAIN)
        entries = sorted(cache.glob("*.json"))
        assert len(entries) == 2  # one per feature
        assert "computed" in caplog.text
        caplog.clear()
        assert norm_stats_entry(meta, args, "bounds_q99", TRAIN) == first
        assert "reused" in caplog.text and "computed" not in caplog.text
        caplog.clear()

        data_file = next((root / "data").rglob("*.parquet"))  # an edit in place: same size, new mtime
        stat = data_file.stat()
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert norm_stats_entry(meta, args, "bounds_q99", TRAIN) == first
        assert "computed" in caplog.text and "reused" not in caplog.text
    assert len(list(cache.glob("*.json"))) == 4
    assert not list(cache.glob("*.tmp"))


def test_write_stats_to_dataset_only_for_every_episode(dataset_root, copy_of, tmp_path):
    root = copy_of(dataset_root, quantiles=False)
    stats_path = root / "meta" / "stats.json"
    before = stats_path.read_bytes()
    args = data_args(root, stats_cache_dir=str(tmp_path / "cache"), write_stats_to_dataset=True)
    meta = load_metadata(args)
    with pytest.raises(RecipeError, match=r"write_stats_to_dataset: the run trains on 4 of 6 episodes.*drop"):
        norm_stats_entry(meta, args, "bounds_q99", TRAIN)
    assert stats_path.read_bytes() == before

    entry = norm_stats_entry(meta, args, "bounds_q99", list(range(6)))
    written = json.loads(stats_path.read_text())
    assert (
        written["action"]["q99"]
        == entry["action"]["q99"]
        == numpy_quantiles(root, "action", list(range(6)))["q99"].tolist()
    )
    assert written["observation.state"]["q01"] == entry["proprio"]["q01"]
    assert written["timestamp"] == json.loads(before)["timestamp"]  # other features kept as they were


def given_stats_file(tmp_path: Path, layout: str, **action) -> Path:
    """A statistics file as a recipe gives it: OpenVLA's dataset_statistics.json, a config.json or LeRobot's."""
    stats = {"q01": [-0.5] * 7, "q99": [0.5] * 7, "min": [-1.0] * 7, "max": [1.0] * 7, **action}
    entry = {"action": stats, "num_transitions": 10, "num_trajectories": 1}
    data = {
        "openvla": {"bridge_orig": entry, "fractal": entry},
        "config": {"model_type": "openvla", "norm_stats": {"bridge_orig": entry}},
        "lerobot": {"action": stats},
    }[layout]
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("layout", ["openvla", "config", "lerobot"])
def test_given_stats_formats(dataset_root, tmp_path, layout):
    path = given_stats_file(tmp_path, layout)
    key = "bridge_orig" if layout == "openvla" else None
    args = data_args(dataset_root, norm_stats_path=str(path), norm_stats_key=key, stats_cache_dir=str(tmp_path))
    stats = dataset_norm_stats(load_metadata(args), args, "bounds_q99", [True] * 6 + [False], TRAIN)[REPO]
    assert stats["action"]["q99"] == [0.5] * 7 and stats["action"]["mask"] == [True] * 6 + [False]
    assert stats["proprio"]["q99"] == numpy_quantiles(dataset_root, "observation.state", TRAIN)["q99"].tolist()


@pytest.mark.parametrize(
    ("layout", "key", "action", "message"),
    [
        ("openvla", None, {}, r"holds statistics of several datasets; set norm_stats_key to one of \['bridge_orig', "),
        ("openvla", "libero", {}, r"norm_stats_key='libero' is not in .*; it has \['bridge_orig', 'fractal'\]"),
        (
            "config",
            None,
            {"q99": [0.5] * 6},
            r"holds 6/7-dim statistics for 'action', but the dataset's 'action' has 7",
        ),
        ("lerobot", None, {"q01": None}, r"needs q01 for 'action', which norm_stats_path .* lacks; .*drop norm_stats"),
    ],
)
def test_given_stats_errors_name_the_key_and_fix(dataset_root, tmp_path, layout, key, action, message):
    path = given_stats_file(tmp_path, layout, **action)
    if action.get("q01", 0) is None:  # a file without q01
        data = json.loads(path.read_text())
        del data["action"]["q01"]
        path.write_text(json.dumps(data))
    args = data_args(dataset_root, norm_stats_path=str(path), norm_stats_key=key, stats_cache_dir=str(tmp_path))
    with pytest.raises(RecipeError, match=message):
        norm_stats_entry(load_metadata(args), args, "bounds_q99", TRAIN)


def test_stats_that_cannot_be_had_are_a_clear_error(dataset_root, tmp_path):
    args = data_args(dataset_root, stats_cache_dir=str(tmp_path))
    with pytest.raises(RecipeError, match=r"statistics of 'action', 'observation.state' .*select episodes or give"):
        norm_stats_entry(load_metadata(args), args, "quantiles", [])
    with pytest.raises(RecipeError, match="norm_stats_path='nowhere.json' is not a file"):
        norm_stats_entry(load_metadata(args), data_args(dataset_root, norm_stats_path="nowhere.json"), "quantiles")


def sft_recipe(tmp_path: Path, root, name: str, **overrides) -> Path:
    """The OpenVLA demo recipe on ``root``, a few steps, no eval, the statistics cache in ``tmp_path``."""
    recipe = {
        **yaml.safe_load((ROOT / "recipes/demo/openvla.yaml").read_text()),
        "dataset_root": str(root),
        "train_episodes": ["0:4"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / name),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "dataloader_num_workers": 0,
        "stats_cache_dir": str(tmp_path / "stats_cache"),
        "norm_stats_path": None,
        **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def saved_stats(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["norm_stats"][REPO]


def test_sft_computes_missing_quantiles_then_reuses_them_and_takes_given_ones(dataset_root, copy_of, tmp_path):
    root = copy_of(dataset_root, quantiles=False)
    first = run([sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(sft_recipe(tmp_path, root, "a"))])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "norm stats: computed" in first.stderr and "meta/stats.json lacks q01, q99" in first.stderr
    stats = saved_stats(tmp_path / "a")
    for name, values in numpy_quantiles(root, "action", TRAIN).items():
        assert stats["action"][name] == values.tolist()  # numpy's quantiles over the training frames, bit for bit
    assert stats["proprio"]["q99"] == numpy_quantiles(root, "observation.state", TRAIN)["q99"].tolist()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| q99 | " + " | ".join(f"{v:.6g}" for v in stats["action"]["q99"]) + " |" in card

    cache = {p: p.stat().st_mtime_ns for p in (tmp_path / "stats_cache").glob("*.json")}
    given = given_stats_file(tmp_path, "openvla", q99=[0.75] * 7)
    recipe = sft_recipe(tmp_path, root, "b", norm_stats_path=str(given), norm_stats_key="fractal")
    second = run([sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(recipe)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "norm stats: reused the cached mean/std/min/max/q01/q99 of 'observation.state'" in second.stderr
    assert "norm stats: computed" not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "stats_cache").glob("*.json")} == cache
    stats = saved_stats(tmp_path / "b")
    assert stats["action"]["q99"] == [0.75] * 7 and stats["proprio"] == saved_stats(tmp_path / "a")["proprio"]
    assert "| q99 | " + " | ".join(["0.75"] * 7) + " |" in (tmp_path / "b" / "README.md").read_text()


@pytest.mark.slow
def test_ddp_ranks_compute_once(dataset_root, copy_of, tmp_path):
    """Two DDP ranks (gloo): the main process computes the statistics once and sends them to the other rank, which
    neither computes nor reads them again (vla_recipes.main_process.on_main_process)."""
    root = copy_of(dataset_root, quantiles=False)
    result = accelerate_launch(
        "recipes/sft.py", "--config", str(sft_recipe(tmp_path, root, "ddp")), config="multi_cpu.yaml", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("norm stats: computed") == 1 and result.stderr.count("norm stats: reused") == 0
    assert saved_stats(tmp_path / "ddp")["action"]["q99"] == numpy_quantiles(root, "action", TRAIN)["q99"].tolist()
