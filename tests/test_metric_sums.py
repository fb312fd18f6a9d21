"""``MetricSums``: per-step metrics kept on the device, averaged once per log (the 2-process case is in
``test_distributed``: the metrics of a DDP run equal those of one process with the whole batch)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_metric_sums_average_each_metric_over_its_own_steps():
    """One process: the logged value is the mean of the micro-steps' values, as when each was read with .item()."""
    from vla_recipes.trainers.metric_sums import MetricSums

    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), reduce=lambda t, reduction: t)
    sums = MetricSums()
    for value in (0.25, 0.5, 1.0):
        sums.add("action_accuracy", torch.tensor(value))
    sums.add("action_l1", torch.tensor(2.0, dtype=torch.float64))
    assert sums.means(accelerator) == pytest.approx({"action_accuracy": 1.75 / 3, "action_l1": 2.0})
    assert sums.means(accelerator) == {}  # the next window starts empty
