"""Checks of what a user hands a processor (images, robot state, task text), where it enters the model.

A policy given a NaN pixel, a NaN state, a float image in 0..255 or an empty instruction still returns actions:
NaN becomes a black pixel or the top state bin, 0..255 saturates to white, an empty task drops the language. Each
is refused here, naming the sample, so that neither training (the collators call the processors) nor
``predict_action`` works silently on wrong input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Float images are taken as [0, 1]; values within half a uint8 step of it round into range (a resampled image).
FLOAT_IMAGE_TOLERANCE = 0.5 / 255


def check_batch(count: int, what: str = "images") -> None:
    """Refuse an empty batch (it would fail deep inside torch.stack or the tokenizer)."""
    if count == 0:
        raise ValueError(f"no {what}: pass at least one sample")


def check_image_values(image: np.ndarray | torch.Tensor, index: int) -> None:
    """One image of a batch: finite, and a float image in [0, 1] (uint8 images are always in range)."""
    values = torch.as_tensor(image)
    if not values.is_floating_point():
        return
    if not torch.isfinite(values).all():
        raise ValueError(f"image {index} has NaN or inf values")
    low, high = float(values.min()), float(values.max())
    if low < -FLOAT_IMAGE_TOLERANCE or high > 1 + FLOAT_IMAGE_TOLERANCE:
        raise ValueError(
            f"image {index} is float with values in [{low:.3g}, {high:.3g}]; float images must be in [0, 1]: divide "
            "a 0..255 image by 255, or pass it as uint8"
        )


def check_state_values(state: torch.Tensor) -> None:
    """A [B, state_dim] robot state: every value finite."""
    bad = (~torch.isfinite(state)).reshape(len(state), -1).any(dim=1)
    if bad.any():
        raise ValueError(f"state of samples {bad.nonzero().flatten().tolist()[:10]} has NaN or inf values")


def check_tasks(tasks: Sequence[str]) -> None:
    """Every task a non-empty string: the instruction the policy follows."""
    check_batch(len(tasks), "tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"task {i} is {task!r}: pass the instruction (e.g. 'pick up the red cube')")
