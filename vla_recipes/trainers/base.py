"""``VLATrainer``: the ``transformers.Trainer`` every model family's trainer builds on.

It adds what VLA fine-tuning needs on top of the stock loop: per-family metrics (action accuracy,
action L1, ...) logged next to the loss in train and eval, averaged over the logging window and
across processes, and an evaluation step that runs the same loss code as training.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer


class VLATrainer(Trainer):
    """Subclasses implement :meth:`compute_metrics_from_outputs`; everything else is shared."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_metrics_from_outputs(self, inputs: dict, outputs) -> dict[str, torch.Tensor]:
        """Scalar metrics of one micro-batch (no grad); the loss itself is logged by the Trainer."""
        return {}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            for name, value in self.compute_metrics_from_outputs(inputs, outputs).items():
                value = self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean()
                self._metrics[mode][name].append(value.item())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """Eval runs the training loss (and its metrics); no logits are kept."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{name}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)
