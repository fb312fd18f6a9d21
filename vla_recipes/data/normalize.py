"""Normalisation of state and action vectors with a dataset's statistics.

The statistics travel inside the model's ``config.norm_stats`` in OpenVLA's ``dataset_statistics.json``
layout, so a model fine-tuned here, openvla/openvla-7b and pi0.5 read them the same way::

    {dataset_key: {"action": {"mean", "std", "min", "max", "q01", "q99", "mask"?},
                   "proprio": {...same...},
                   "num_transitions": int, "num_trajectories": int}}

Modes (formulas from the reference implementations):

- ``bounds_q99`` (OpenVLA ``BOUNDS_Q99``): ``clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)`` where ``mask``,
  ``x`` unchanged elsewhere (the gripper), and dims with ``min == max`` set to 0.
- ``quantiles`` (LeRobot/pi0.5 ``QUANTILES``): ``2 (x - q01) / (q99 - q01) - 1``, no clipping.
- ``mean_std`` (pi0): ``(x - mean) / (std + 1e-8)``.
- ``min_max``: ``2 (x - min) / (max - min) - 1``.
- ``identity``: unchanged.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

NormMode = Literal["bounds_q99", "quantiles", "mean_std", "min_max", "identity"]
NORM_MODES: tuple[str, ...] = get_args(NormMode)
EPS = 1e-8

# Which statistics each mode reads; used to fail early when a dataset lacks them.
REQUIRED_STATS: dict[str, tuple[str, ...]] = {
    "bounds_q99": ("q01", "q99", "min", "max"),
    "quantiles": ("q01", "q99"),
    "mean_std": ("mean", "std"),
    "min_max": ("min", "max"),
    "identity": (),
}

Array = np.ndarray | torch.Tensor


def _as(x: Array, value) -> Array:
    """``value`` (list/array) as the same kind, dtype and device as ``x``."""
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(np.asarray(value), dtype=x.dtype, device=x.device)
    return np.asarray(value, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)


def _where(cond: Array, a: Array, b: Array) -> Array:
    return torch.where(cond, a, b) if isinstance(a, torch.Tensor) else np.where(cond, a, b)


def _clip(x: Array, lo: float, hi: float) -> Array:
    return torch.clamp(x, lo, hi) if isinstance(x, torch.Tensor) else np.clip(x, lo, hi)


def _mask(x: Array, stats: dict) -> Array:
    """The per-dimension mask (True = normalise); all True when the stats carry none."""
    mask = stats.get("mask")
    if mask is None:
        mask = [True] * len(next(v for k, v in stats.items() if k != "mask"))
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(np.asarray(mask, dtype=bool), device=x.device)
    return np.asarray(mask, dtype=bool)


def _nonzero(denom: Array) -> Array:
    """LeRobot's guard: a zero range becomes EPS (so a constant dim maps to a finite value)."""
    return _where(denom == 0, _as(denom, EPS) + 0 * denom, denom)


def check_stats(stats: dict, mode: str, key: str) -> None:
    """Raise a one-line error naming the missing statistic and the fix."""
    if mode not in NORM_MODES:
        raise ValueError(f"norm_mode={mode!r} is not one of {', '.join(NORM_MODES)}")
    missing = [s for s in REQUIRED_STATS[mode] if s not in stats]
    if missing:
        raise ValueError(
            f"norm_mode={mode!r} needs {', '.join(missing)} for {key!r}, which the dataset's meta/stats.json "
            f"lacks (it has {', '.join(sorted(stats)) or 'nothing'}); recompute the dataset's stats or pick "
            f"another norm_mode"
        )


def normalize(x: Array, stats: dict, mode: str) -> Array:
    """Normalise ``x`` (last dim = features) with ``stats`` of one feature."""
    if mode == "identity":
        return x
    if mode == "bounds_q99":
        q01, q99 = _as(x, stats["q01"]), _as(x, stats["q99"])
        y = _clip(2 * (x - q01) / (q99 - q01 + EPS) - 1, -1.0, 1.0)
        y = _where(_mask(x, stats), y, x)
        return _where(_as(x, stats["min"]) == _as(x, stats["max"]), 0 * y, y)
    if mode == "quantiles":
        q01, q99 = _as(x, stats["q01"]), _as(x, stats["q99"])
        return 2 * (x - q01) / _nonzero(q99 - q01) - 1
    if mode == "mean_std":
        return (x - _as(x, stats["mean"])) / (_as(x, stats["std"]) + EPS)
    if mode == "min_max":
        lo, hi = _as(x, stats["min"]), _as(x, stats["max"])
        return 2 * (x - lo) / _nonzero(hi - lo) - 1
    raise ValueError(f"norm_mode={mode!r} is not one of {', '.join(NORM_MODES)}")


def unnormalize(y: Array, stats: dict, mode: str) -> Array:
    """Inverse of :func:`normalize` (up to its clipping)."""
    if mode == "identity":
        return y
    if mode == "bounds_q99":
        q01, q99 = _as(y, stats["q01"]), _as(y, stats["q99"])
        return _where(_mask(y, stats), 0.5 * (y + 1) * (q99 - q01) + q01, y)
    if mode == "quantiles":
        q01, q99 = _as(y, stats["q01"]), _as(y, stats["q99"])
        return (y + 1) / 2 * _nonzero(q99 - q01) + q01
    if mode == "mean_std":
        return y * _as(y, stats["std"]) + _as(y, stats["mean"])
    if mode == "min_max":
        lo, hi = _as(y, stats["min"]), _as(y, stats["max"])
        return (y + 1) / 2 * _nonzero(hi - lo) + lo
    raise ValueError(f"norm_mode={mode!r} is not one of {', '.join(NORM_MODES)}")


def select_stats(norm_stats: dict, unnorm_key: str | None) -> dict:
    """Pick one dataset's entry of ``norm_stats``; ``None`` is allowed when there is exactly one."""
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise ValueError(
                f"the model holds statistics for several datasets; pass unnorm_key= one of {sorted(norm_stats)}"
            )
        return next(iter(norm_stats.values()))
    if unnorm_key not in norm_stats:
        raise ValueError(f"unnorm_key={unnorm_key!r} is not in the model's norm_stats: {sorted(norm_stats)}")
    return norm_stats[unnorm_key]
