"""``OpenVLATrainer``: cross-entropy on the action tokens, with OpenVLA's fine-tuning metrics."""

from __future__ import annotations

import torch

from vla_recipes.trainers.base import VLATrainer


class OpenVLATrainer(VLATrainer):
    """The loss is the model's own (shifted CE over the labelled tokens, token-exact under gradient
    accumulation via ``num_items_in_batch``). Logged next to it, as in OpenVLA's ``finetune.py``:

    - ``action_accuracy``: greedy next-token accuracy over the action tokens (EOS excluded);
    - ``action_l1``: mean |decoded prediction - decoded target| in normalised [-1, 1] units.
    """

    def __init__(self, *args, action_tokenizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.action_tokenizer = action_tokenizer

    def compute_metrics_from_outputs(self, inputs: dict, outputs) -> dict[str, torch.Tensor]:
        labels = inputs["labels"]
        # Text token k sits at multimodal position num_patches + k and is predicted from the one before.
        num_patches = outputs.logits.shape[1] - labels.shape[1]
        preds = outputs.logits[:, num_patches:-1].argmax(-1)
        gt = labels[:, 1:]
        mask = gt > self.action_tokenizer.action_token_begin_idx
        if not mask.any():
            return {}
        decode = self.action_tokenizer.decode_token_ids_to_actions
        l1 = abs(decode(preds[mask].cpu().numpy()) - decode(gt[mask].cpu().numpy())).mean()
        return {
            "action_accuracy": (preds == gt)[mask].float().mean(),
            "action_l1": torch.tensor(l1, device=preds.device),
        }
