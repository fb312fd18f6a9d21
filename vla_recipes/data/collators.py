"""The data collator: a list of ``VLADataset`` samples -> the tensors a model's forward takes.

Every family's processor takes the same call (images per camera, task text, state, and for training the raw
action chunks with their padding flags and each sample's dataset), and does everything model-specific itself:
normalisation, relative actions, OpenVLA's action tokens and labels. So one collator serves every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class VLADataCollator:
    """``processor(images=, text=, state=, actions=, action_is_pad=, unnorm_key=)`` on a batch of samples.

    ``unnorm_key`` is each sample's ``dataset`` (a mixture's samples each use their dataset's statistics; None for
    a single dataset). ``seeded_draws``, given the samples' ``seed`` (``VLADataset``), returns tensors a model draws
    per sample (pi0.5's flow-matching noise and time): drawn here from the sample's own seed instead of by the
    model from the global RNG per batch, the loss does not depend on how samples are split into processes,
    micro-batches or workers (2 processes x batch 4 train exactly as 1 x batch 8), and evaluation is reproducible.
    """

    processor: Callable[..., Any]
    seeded_draws: Callable[[list[int]], dict[str, torch.Tensor]] | None = None

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.processor(
                **observations(samples),
                actions=torch.stack([s["actions"] for s in samples]),
                action_is_pad=torch.stack([s["action_is_pad"] for s in samples]),
                unnorm_key=[s.get("dataset") for s in samples],
            )
        )
        if self.seeded_draws is not None and all("seed" in s for s in samples):
            batch |= self.seeded_draws([s["seed"] for s in samples])
        return batch


def observations(samples: list[dict]) -> dict[str, Any]:
    """Samples' observations as every processor takes them: ``images`` (a list per sample, one image per camera),
    ``text`` (the tasks) and ``state`` (stacked; None when a sample has none). ``processor(**observations(samples))``
    is the inference call."""
    states = [s["state"] for s in samples]
    return {
        "images": [s["images"] for s in samples],
        "text": [s["task"] for s in samples],
        "state": torch.stack(states) if all(state is not None for state in states) else None,
    }
