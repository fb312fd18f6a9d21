"""Normalisation formulas against the references (OpenVLA BOUNDS_Q99, LeRobot QUANTILES/MEAN_STD/MIN_MAX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_recipes.data.normalize import check_stats, normalize, select_stats, unnormalize

RNG = np.random.default_rng(0)
X = RNG.normal(size=(50, 4))
STATS = {
    "mean": X.mean(0).tolist(),
    "std": X.std(0).tolist(),
    "min": X.min(0).tolist(),
    "max": X.max(0).tolist(),
    "q01": np.quantile(X, 0.01, axis=0).tolist(),
    "q99": np.quantile(X, 0.99, axis=0).tolist(),
}


def test_bounds_q99_matches_openvla():
    """OpenVLA: clip(2(x-q01)/(q99-q01+1e-8)-1, -1, 1) where mask, x where not, 0 where min == max."""
    stats = {**STATS, "mask": [True, True, True, False]}
    stats["min"][2] = stats["max"][2] = 0.5
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    expected = np.clip(2 * (X - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    expected[:, 3] = X[:, 3]
    expected[:, 2] = 0.0
    np.testing.assert_allclose(normalize(X, stats, "bounds_q99"), expected)
    # The inverse (OpenVLA's predict_action) leaves the unmasked gripper untouched.
    y = RNG.uniform(-1, 1, size=(5, 4))
    back = unnormalize(y, stats, "bounds_q99")
    np.testing.assert_allclose(back[:, :3], 0.5 * (y[:, :3] + 1) * (q99[:3] - q01[:3]) + q01[:3])
    np.testing.assert_allclose(back[:, 3], y[:, 3])


@pytest.mark.parametrize("mode", ["quantiles", "mean_std", "min_max", "identity"])
def test_round_trip_numpy_and_torch(mode):
    y = normalize(X, STATS, mode)
    np.testing.assert_allclose(unnormalize(y, STATS, mode), X, atol=1e-6)
    yt = normalize(torch.tensor(X), STATS, mode)
    assert isinstance(yt, torch.Tensor)
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-12)


def test_quantiles_match_lerobot():
    """LeRobot: 2(x-q01)/(q99-q01)-1 with no clipping (values beyond the quantiles exceed [-1, 1])."""
    q01, q99 = np.array(STATS["q01"]), np.array(STATS["q99"])
    y = normalize(X, STATS, "quantiles")
    np.testing.assert_allclose(y, 2 * (X - q01) / (q99 - q01) - 1)
    assert np.abs(y).max() > 1


def test_missing_stat_is_named():
    with pytest.raises(ValueError, match="needs q01, q99 for 'action'"):
        check_stats({"mean": [0.0], "std": [1.0]}, "quantiles", "action")


def test_select_stats():
    assert select_stats({"a": 1}, None) == 1
    with pytest.raises(ValueError, match="unnorm_key"):
        select_stats({"a": 1, "b": 2}, None)
    with pytest.raises(ValueError, match="'c' is not in"):
        select_stats({"a": 1}, "c")
