"""Normalisation of state and action vectors with a dataset's statistics.

The statistics travel inside the model's ``config.norm_stats``, their one store (the processor reads them from the
config and the model un-normalises its predictions with them, both through :class:`Normalizer`), in OpenVLA's
``dataset_statistics.json`` layout, so a model fine-tuned here, openvla/openvla-7b and pi0.5 read them the same way::

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

Relative (delta) actions, made here too because they are made and undone next to normalisation (before it for
training, after un-normalisation at inference): each action of a chunk minus the current state, for chosen dims.
openpi's ``DeltaActions`` / ``AbsoluteActions`` transforms (``extra_delta_transform``; moves pi0-FAST from ~60 % to
~85 % on LIBERO-10) and LeRobot's ``use_relative_actions``: the policy learns offsets from where the robot is, which
vary less across episodes than absolute targets. The recipe keys are ``relative_actions: true`` and
``relative_action_mask`` (True: made relative); the default mask is every dim but the last (the gripper stays
absolute), openpi's ``make_bool_mask(n - 1, -1)``. State dim ``i`` (of the state the model sees, after
``state_indices``) is subtracted from action dim ``i``; a mask shorter than the action leaves the dims past it
absolute (as openpi and LeRobot). The statistics are those of the relative actions (``stats``). The arithmetic is
LeRobot's ``to_relative_actions`` / ``to_absolute_actions``, written out because models must not import LeRobot's
processor package (seconds of imports) to add a vector. The recipe check is ``lerobot.relative_action_mask``.

This module imports nothing from the package: it travels with a saved model's remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

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


def default_relative_mask(action_dim: int) -> list[bool]:
    """Every dim relative but the last (the gripper): openpi's ``make_bool_mask(action_dim - 1, -1)``."""
    return [True] * (action_dim - 1) + [False]


def _offset(state: Array, mask: list[bool], like: Array) -> Array:
    """The state on the masked action dims, zero elsewhere, broadcast over the chunk: [..., 1, len(mask)]."""
    dims = len(mask)
    if isinstance(like, torch.Tensor):
        weights = torch.as_tensor(mask, dtype=like.dtype, device=like.device)
        state = torch.as_tensor(state).to(device=like.device, dtype=like.dtype)
    else:
        weights, state = np.asarray(mask, dtype=like.dtype), np.asarray(state, dtype=like.dtype)
    return (state[..., :dims] * weights)[..., None, :]


def to_relative(actions: Array, state: Array, mask: list[bool]) -> Array:
    """Action chunks [..., horizon, action_dim] minus the state [..., state_dim] on the masked dims (a copy)."""
    out = actions.clone() if isinstance(actions, torch.Tensor) else np.array(actions)
    out[..., : len(mask)] -= _offset(state, mask, actions)
    return out


def to_absolute(actions: Array, state: Array, mask: list[bool]) -> Array:
    """The inverse of :func:`to_relative`: the state added back on the masked dims (a copy)."""
    out = actions.clone() if isinstance(actions, torch.Tensor) else np.array(actions)
    out[..., : len(mask)] += _offset(state, mask, actions)
    return out


UnnormKeys = str | list[str | None] | None  # one dataset for the batch, or one per sample (a mixture's batches)


@dataclass
class Normalizer:
    """The one place a model's inputs are normalised and its predicted actions turned back into dataset units.

    Built from the model config (:meth:`from_config`), where the statistics are saved, so the processor (which
    normalises the state, and the actions of a training batch) and ``predict_action`` (which un-normalises) read the
    same numbers and nothing is copied. With ``relative_action_mask`` the actions are made relative to the raw state
    before normalisation (in float64) and made absolute again after un-normalisation."""

    norm_mode: str = "identity"
    norm_stats: dict | None = None
    default_unnorm_key: str | None = None  # a mixture's heaviest dataset, used when no key is given
    relative_action_mask: list[bool] | None = None

    @classmethod
    def from_config(cls, config: Any) -> Normalizer:
        return cls(
            norm_mode=config.norm_mode,
            norm_stats=config.norm_stats,
            default_unnorm_key=getattr(config, "default_unnorm_key", None),
            relative_action_mask=getattr(config, "relative_action_mask", None),
        )

    def stats(self, feature: str, unnorm_key: str | None = None, dim: int | None = None) -> dict:
        """One dataset's statistics of ``feature`` (``"action"`` or ``"proprio"``), checked for the mode and ``dim``."""
        if self.norm_mode == "identity":
            return {}
        if not self.norm_stats:
            raise ValueError(
                f"config.norm_stats is empty, so norm_mode={self.norm_mode!r} cannot map {feature!r} to and from "
                "dataset units; set it to the training set's statistics"
            )
        stats = select_stats(self.norm_stats, unnorm_key or self.default_unnorm_key).get(feature, {})
        check_stats(stats, self.norm_mode, feature)
        dims = {len(value) for key, value in stats.items() if key in REQUIRED_STATS[self.norm_mode]}
        if dim is not None and dims != {dim}:
            what = f"state has {dim} dims" if feature == "proprio" else f"{feature} has {feature}_dim={dim}"
            raise ValueError(f"{what} but the {feature!r} statistics have {sorted(dims)} dims")
        return stats

    def has(self, feature: str) -> bool:
        """Whether the statistics hold ``feature`` (a model trained without a state has no ``"proprio"``)."""
        return self.norm_mode == "identity" or any(feature in entry for entry in (self.norm_stats or {}).values())

    def normalize(self, x: Array, feature: str, unnorm_keys: UnnormKeys = None) -> Array:
        """``x`` [B, ..., dim] normalised, each sample with its dataset's statistics."""
        dim = x.shape[-1]
        return self._per_dataset(
            x, unnorm_keys, lambda rows, key: normalize(rows, self.stats(feature, key, dim), self.norm_mode)
        )

    def unnormalize(self, y: Array, feature: str, unnorm_keys: UnnormKeys = None) -> Array:
        """Inverse of :meth:`normalize` (up to its clipping)."""
        dim = y.shape[-1]
        return self._per_dataset(
            y, unnorm_keys, lambda rows, key: unnormalize(rows, self.stats(feature, key, dim), self.norm_mode)
        )

    def actions_to_model(self, actions: Array, state: Array | None, unnorm_keys: UnnormKeys = None) -> Array:
        """Dataset-unit action chunks [B, horizon, action_dim] -> the training targets (relative, then normalised).
        The dtype is kept; relative actions are computed in float64 and cast back."""
        if self.relative_action_mask is not None:
            if state is None:
                raise ValueError("relative_action_mask: actions are made relative to the state; give state=")
            dtype = actions.dtype
            actions = to_relative(_float64(actions), _float64(state), self.relative_action_mask)
            actions = actions.to(dtype) if isinstance(actions, torch.Tensor) else actions.astype(dtype)
        return self.normalize(actions, "action", unnorm_keys)

    def actions_from_model(
        self, normalized: Array, reference_state: Array | None, unnorm_key: str | None = None
    ) -> Array:
        """Predicted (normalised) action chunks -> dataset units; relative ones get ``reference_state``, the raw
        state, added back so the actions are absolute either way."""
        if self.relative_action_mask is not None and reference_state is None:
            raise ValueError(
                "this model predicts actions relative to the state (config.relative_action_mask): pass "
                "reference_state= the raw state [batch, state_dim] (the processor's output has it)"
            )
        actions = self.unnormalize(normalized, "action", unnorm_key)
        if self.relative_action_mask is None:
            return actions
        return to_absolute(actions, reference_state, self.relative_action_mask)

    def check_reference_state(self, reference_state: Array | None) -> None:
        """A model trained on relative actions cannot return absolute ones without the raw state."""
        if self.relative_action_mask is not None and reference_state is None:
            raise ValueError(
                "this model predicts actions relative to the state (config.relative_action_mask): pass "
                "reference_state= the raw state [batch, state_dim] (the processor's output has it)"
            )

    @staticmethod
    def _per_dataset(x: Array, unnorm_keys: UnnormKeys, apply) -> Array:
        """``apply(rows, key)`` on the rows of each dataset; one call when the batch has one dataset."""
        if not isinstance(unnorm_keys, list) or len(set(unnorm_keys)) == 1:
            return apply(x, unnorm_keys[0] if isinstance(unnorm_keys, list) else unnorm_keys)
        out = x.clone() if isinstance(x, torch.Tensor) else np.array(x)
        for key in dict.fromkeys(unnorm_keys):
            rows = [i for i, k in enumerate(unnorm_keys) if k == key]
            out[rows] = apply(x[rows], key)
        return out


def _float64(x: Array) -> Array:
    return torch.as_tensor(x).double() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
