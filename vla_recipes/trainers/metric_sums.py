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
from accelerate.utils import gather_object


class MetricSums:
    """The sum and count of each metric since the last :meth:`means`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor, count: torch.Tensor | float = 1.0) -> None:
        """One micro-batch's value. ``count`` 0 (a device tensor: deciding it on the host would sync): the metric
        does not apply to this micro-batch (OpenVLA's action metrics on a batch without action tokens)."""
        value = value.detach().float().reshape(())
        count = torch.as_tensor(count, dtype=value.dtype, device=value.device).reshape(())
        self._sums[name] = self._sums[name] + value * count if name in self._sums else value * count
        self._counts[name] = self._counts[name] + count if name in self._counts else count

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Every metric's mean over the window and the processes; starts the next window.

        Every process calls it at the same log (the Trainer logs on all of them). A metric a process did not see
        in the window (a family may skip one for a batch without its tokens) counts zero there.
        """
        names = sorted(self._sums)
        if accelerator.num_processes > 1:  # the union of the names: one small object gather per log
            names = sorted({name for names in gather_object([names]) for name in names})
        if not names:
            return {}
        zero = torch.zeros((), device=accelerator.device)
        sums = torch.stack([self._sums.get(name, zero).to(accelerator.device) for name in names])
        counts = torch.stack([self._counts.get(name, zero).to(accelerator.device) for name in names])
        totals = accelerator.reduce(torch.cat([sums, counts]), reduction="sum").tolist()
        self._sums.clear()
        self._counts.clear()
        return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names) if totals[len(names) + i]}
