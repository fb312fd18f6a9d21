"""``OpenVLAOFTTrainer``: OpenVLA-OFT fine-tuning on the L1 loss of continuous action chunks."""

from __future__ import annotations

import torch

from vla_recipes.trainers.flow_matching import FlowMatchingTrainer


class OpenVLAOFTTrainer(FlowMatchingTrainer):
    """The loss is the model's own (L1 on normalised actions over the real chunk steps). Its divisor under gradient
    accumulation is counted as flow matching counts it (real steps x action dims, from ``action_is_pad``), so that
    logic is inherited. Logged next to the loss, as openvla-oft's ``finetune.py`` logs them: the L1 of the chunk's
    first action (``curr_action_l1``, the one executed) and of the others (``next_actions_l1``)."""

    def compute_metrics_from_outputs(self, inputs: dict, outputs) -> dict[str, torch.Tensor]:
        real = (~inputs["action_is_pad"].bool()).float()
        dims = outputs.losses.shape[-1]
        per_step = outputs.losses.sum(-1)  # padded steps are zero
        metrics = {"curr_action_l1": per_step[:, 0].sum() / (real[:, 0].sum() * dims).clamp(min=1)}
        if per_step.shape[1] > 1:
            metrics["next_actions_l1"] = per_step[:, 1:].sum() / (real[:, 1:].sum() * dims).clamp(min=1)
        return metrics
