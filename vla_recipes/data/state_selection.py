"""Which dims of the dataset's state the model sees (``state_indices``).

Some datasets store a wide proprioception vector (BEHAVIOR-1K: 256 dims) where the policy takes a few of its
entries (the joint positions) and pi0.5 has a 32-dim state slot. The selection is applied in three places, all
from :func:`state_selection`: the model's ``state_dim`` (sft.py), the samples (``VLADataset``) and the state's
normalisation statistics (``stats.norm_stats_entry``); it is saved as ``config.state_indices``.
"""

from __future__ import annotations

import numpy as np

from vla_recipes.configs import DataArguments, RecipeError, parse_episodes


def feature_dim(meta, key: str) -> int:
    """Flat size of a dataset feature (its values as a vector)."""
    return int(np.prod(meta.features[key]["shape"]))


def state_selection(meta, data_args: DataArguments) -> list[int] | None:
    """The state dims the model sees, in order (None: every dim), checked against the dataset's state feature."""
    if data_args.state_indices is None:
        return None
    if data_args.state_key is None:
        raise RecipeError("state_indices selects dims of the state, but state_key is None (no state)")
    indices = parse_episodes(data_args.state_indices, what="state_indices:")
    dim = feature_dim(meta, data_args.state_key)
    if not indices:
        raise RecipeError("state_indices selects no dim; drop it to use the whole state")
    if bad := [i for i in indices if not 0 <= i < dim]:
        raise RecipeError(
            f"state_indices: {bad[:5]} out of range: the dataset's {data_args.state_key!r} has {dim} dims "
            f"(indices 0..{dim - 1})"
        )
    if len(set(indices)) != len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise RecipeError(f"state_indices selects dims {repeated[:5]} more than once")
    return indices
