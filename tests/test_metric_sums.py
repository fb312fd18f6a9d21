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


def test_a_metric_counts_only_the_micro_batches_it_applies_to():
    """A ``(value, count)`` metric with count 0 (decided on the device) leaves the mean, and is not logged when no
    micro-batch of the window had it."""
    from vla_recipes.trainers.metric_sums import MetricSums

    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), reduce=lambda t, reduction: t)
    sums = MetricSums()
    sums.add("action_l1", torch.tensor(0.5), torch.tensor(1.0))
    sums.add("action_l1", torch.tensor(9.0), torch.tensor(0.0))  # no action token in this micro-batch
    sums.add("action_l1", torch.tensor(0.25))
    sums.add("never", torch.tensor(3.0), torch.tensor(0.0))
    assert sums.means(accelerator) == pytest.approx({"action_l1": 0.375})


def test_openvla_action_metrics_equal_the_reference_decode_on_the_device():
    """``action_accuracy`` / ``action_l1`` computed with tensors equal OpenVLA's numpy decode of the action tokens
    (prompt tokens and -100 labels left out), and a batch without action tokens counts zero."""
    import numpy as np

    from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
    from vla_recipes.models.openvla.action_tokenizer import ActionTokenizer
    from vla_recipes.models.openvla.trainer import action_token_metrics

    tokenizer = ActionTokenizer(build_llama_like_tokenizer())
    g = torch.Generator().manual_seed(0)
    low, high = tokenizer.action_token_begin_idx + 1, tokenizer.vocab_size
    targets = torch.randint(low, high, (4, 9), generator=g)
    targets[:, :2] = torch.randint(0, low, (4, 2), generator=g)  # prompt tokens
    targets[0, -1] = -100
    preds = torch.where(torch.rand(4, 9, generator=g) < 0.3, targets, torch.randint(low, high, (4, 9), generator=g))
    preds = preds.clamp(min=0)
    metrics = action_token_metrics(preds, targets, tokenizer)

    mask = (targets > tokenizer.action_token_begin_idx).numpy()
    decode = tokenizer.decode_token_ids_to_actions
    l1 = np.abs(decode(preds.numpy()[mask]) - decode(targets.numpy()[mask])).mean()
    accuracy = (preds == targets).numpy()[mask].mean()
    assert metrics["action_l1"][1].item() == metrics["action_accuracy"][1].item() == 1.0
    assert metrics["action_l1"][0].item() == pytest.approx(l1, abs=1e-6)
    assert metrics["action_accuracy"][0].item() == pytest.approx(accuracy, abs=1e-7)
    assert 0 < accuracy < 1
    prompt_only = action_token_metrics(preds[:, :2], targets[:, :2], tokenizer)
    assert prompt_only["action_l1"][1].item() == prompt_only["action_accuracy"][1].item() == 0.0
