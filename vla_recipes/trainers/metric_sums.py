"""Per-step metrics kept on the device as sums and counts, reduced across processes once per log.

Reading a metric each micro-step (``.item()``) makes the host wait for the device every step, and gathering it
then is one collective per metric per micro-step; ``gather_for_metrics`` also drops "duplicate" entries of the
last batch from per-process scalars. Here a micro-step only adds on the device; a log is one all-reduce of every
metric's sum and count, whose ratio is the mean over every micro-batch of every process in the window (on one
process, the mean of the micro-steps' values, as before).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class MetricSums:
    """The sum and count of each metric since the last :meth:`means`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(())
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Every metric's mean over the window and the processes; starts the next window.

        Every process calls it at the same log (the Trainer logs on all of them) with the same metric names.
        """
        if not self._sums:
            return {}
        names = sorted(self._sums)
        sums = torch.stack([self._sums[name] for name in names])
        counts = torch.tensor([self._counts[name] for name in names], dtype=sums.dtype, device=sums.device)
        totals = accelerator.reduce(torch.cat([sums, counts]), reduction="sum").tolist()
        self._sums.clear()
        self._counts.clear()
        return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names)}
