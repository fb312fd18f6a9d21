"""``FlowMatchingTrainer``: pi0.5 / pi0 fine-tuning on the flow-matching velocity loss."""

from __future__ import annotations

import torch

from vla_recipes.trainers.base import VLATrainer


class FlowMatchingTrainer(VLATrainer):
    """The loss is the model's own: MSE between the predicted and true velocity (``noise - actions``) at a time
    ``t ~ Beta(1.5, 1)``, over the real action dims and the unpadded chunk steps.

    Under gradient accumulation the divisor is the number of real (step, dim) elements of the whole window,
    counted here from ``action_is_pad`` (the stock Trainer counts ``labels != -100``, which a flow-matching
    batch has not), so accumulated micro-batches give exactly the gradient of one big batch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # forward takes num_items_in_batch

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        action_dim = self.accelerator.unwrap_model(self.model).config.action_dim
        count = sum((~batch["action_is_pad"].bool()).sum() for batch in batch_samples) * action_dim
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_metrics_from_outputs(self, inputs: dict, outputs) -> dict[str, torch.Tensor]:
        """Per-element velocity MSE over real steps, the same in train and eval whatever the accumulation."""
        real = (~inputs["action_is_pad"].bool()).sum() * outputs.losses.shape[-1]
        return {"velocity_mse": outputs.losses.sum() / real.clamp(min=1)}
