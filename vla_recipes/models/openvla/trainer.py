"""``OpenVLATrainer``: cross-entropy on the action tokens, with OpenVLA's fine-tuning metrics."""

from __future__ import annotations

import torch

from vla_recipes.trainers.base import VLATrainer

from .action_tokenizer import ActionTokenizer


def action_token_metrics(
    preds: torch.Tensor, targets: torch.Tensor, tokenizer: ActionTokenizer
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``action_accuracy`` and ``action_l1`` over the action tokens of ``targets`` (next-token ids, any shape), each
    as ``(value, count)``: count 0 when the batch has no action token. Computed on the device (the decode is a lookup
    of the tokenizer's bin centres, ``ActionTokenizer.decode_token_ids_to_actions`` in float32): no host sync per
    micro-step."""
    mask = targets > tokenizer.action_token_begin_idx
    count = mask.sum()
    centers = torch.as_tensor(tokenizer.bin_centers, dtype=torch.float32, device=targets.device)

    def decode(ids: torch.Tensor) -> torch.Tensor:
        return centers[(tokenizer.vocab_size - ids - 1).clamp(0, centers.shape[0] - 1)]

    applies = (count > 0).float()
    l1 = ((decode(preds) - decode(targets)).abs() * mask).sum() / count.clamp(min=1)
    accuracy = ((preds == targets) & mask).sum() / count.clamp(min=1)
    return {"action_accuracy": (accuracy, applies), "action_l1": (l1, applies)}


class OpenVLATrainer(VLATrainer):
    """The loss is the model's own (shifted CE over the labelled tokens, token-exact under gradient
    accumulation via ``num_items_in_batch``). Logged next to it, as in OpenVLA's ``finetune.py``:

    - ``action_accuracy``: greedy next-token accuracy over the action tokens (EOS excluded);
    - ``action_l1``: mean |decoded prediction - decoded target| in normalised [-1, 1] units.
    """

    def __init__(self, *args, action_tokenizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.action_tokenizer = action_tokenizer

    def compute_metrics_from_outputs(self, inputs: dict, outputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        labels = inputs["labels"]
        # Text token k sits at multimodal position num_patches + k and is predicted from the one before.
        num_patches = outputs.logits.shape[1] - labels.shape[1]
        preds = outputs.logits[:, num_patches:-1].argmax(-1)
        return action_token_metrics(preds, labels[:, 1:], self.action_tokenizer)
