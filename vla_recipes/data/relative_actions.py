"""Relative (delta) actions: each action of a chunk minus the current state, for chosen dims.

openpi's ``DeltaActions`` / ``AbsoluteActions`` transforms (``extra_delta_transform``; moves pi0-FAST from ~60 % to
~85 % on LIBERO-10) and LeRobot's ``use_relative_actions``: the policy learns offsets from where the robot is,
which vary less across episodes than absolute targets. The recipe keys are ``relative_actions: true`` and
``relative_action_mask`` (True: made relative); the default mask is every dim but the last (the gripper stays
absolute), openpi's ``make_bool_mask(n - 1, -1)``.

State dim ``i`` (of the state the model sees, after ``state_indices``) is subtracted from action dim ``i``; a mask
shorter than the action leaves the dims past it absolute (as openpi and LeRobot). Training applies it in the
collators, before normalisation, and the statistics are those of the relative actions (``stats``); the model's
``predict_action`` adds the state back, so it returns absolute actions as before.

The arithmetic is LeRobot's ``to_relative_actions`` / ``to_absolute_actions``, written out here because models and
inference must not import LeRobot's processor package (seconds of imports) to add a vector; this module imports
nothing from the package, so it travels with a saved model's remote code. The recipe check is
``lerobot.relative_action_mask``.
"""

from __future__ import annotations

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


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
