"""Weighted mixtures of datasets (``datasets:``): OpenVLA's Open X-Embodiment mixes, in a recipe.

Each entry is one ordinary single-dataset run's data keys (its own repo, revision, key mapping, episodes or tasks)
plus a ``name`` (default: its ``dataset_repo_id``) and a ``weight``; the other data keys (``action_horizon``,
``norm_mode``, ``relative_actions``, caches...) are the recipe's, shared. Every check, the frame cache and the
statistics cache then work per entry exactly as for one dataset (``entry_args`` gives each entry its own
``DataArguments``). Statistics are saved per entry under its name in ``config.norm_stats`` (OpenVLA's
``unnorm_key``); the heaviest entry's name is ``config.default_unnorm_key``, what ``predict_action`` uses when
given no ``unnorm_key``.

Cameras map onto the model's slots by position: the model has as many as the entry with the most cameras (whose
names it keeps), and an entry with fewer leaves the last slots masked, as pi0.5 masks a missing camera. Action and
state dims (after ``state_indices``) must be the same in every entry.

:class:`WeightedMixture` draws, for position ``i`` of epoch ``e``, an entry with probability proportional to its
weight and a uniform sample of it, from a generator seeded by ``(seed, e)``: the same draws in every process,
worker and after a resume (the trainer's sampler then shuffles positions as for any dataset). An epoch has as many
positions as the entries have samples together.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch.utils.data import Dataset

from vla_recipes.configs import ENTRY_KEYS, DataArguments


def entry_args(data_args: DataArguments) -> dict[str, tuple[float, DataArguments]]:
    """Per entry name: its weight and its own ``DataArguments`` (the shared keys with the entry's over them); for a
    single dataset, ``{dataset_repo_id: (1.0, data_args)}``."""
    if data_args.datasets is None:
        return {data_args.dataset_repo_id: (1.0, data_args)}
    entries = {}
    for entry in data_args.datasets:
        fields = {key: entry[key] for key in ENTRY_KEYS if key in entry}
        args = dataclasses.replace(data_args, **fields, datasets=None)
        entries[str(entry.get("name", entry["dataset_repo_id"]))] = (float(entry.get("weight", 1.0)), args)
    return entries


class WeightedMixture(Dataset):
    """Samples of several datasets drawn by weight, reproducibly from ``(seed, epoch)`` (see the module doc)."""

    def __init__(self, datasets: dict[str, Dataset], weights: dict[str, float], seed: int = 0):
        self.names = list(datasets)
        self.datasets = [datasets[name] for name in self.names]
        total = sum(weights[name] for name in self.names)
        self.probabilities = np.asarray([weights[name] / total for name in self.names])
        self.sizes = np.asarray([len(d) for d in self.datasets])
        self.seed = seed
        self.set_epoch(0)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's (entry, sample) pairs; each dataset's own per-sample randomness follows the epoch."""
        self.epoch = epoch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x6D6978]))
        self.which = rng.choice(len(self.datasets), size=len(self), p=self.probabilities)
        self.index = (rng.random(len(self)) * self.sizes[self.which]).astype(np.int64)
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.which[i]][int(self.index[i])]
