"""Camera images -> the [B, cameras, 3, S, S] tensor pi0 / pi0.5 read, plus a mask of which cameras exist.

openpi's (and LeRobot's) preprocessing: each image is resized to fit S x S keeping its aspect ratio (bilinear, no
antialiasing), centre-padded with black, then mapped from [0, 1] to [-1, 1]. A missing camera becomes an all -1
image whose mask is False, so the model ignores its patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from ..input_checks import check_batch, check_image_values

ImageLike = Any  # torch.Tensor, np.ndarray or PIL.Image; float in [0, 1] or uint8; CHW or HWC


def to_float_chw(image: ImageLike, index: int = 0) -> Tensor:
    """One image as float32 [3, H, W] in [0, 1]: uint8 is divided by 255, float is taken as already in [0, 1] (and
    refused outside it, or with NaN; ``index`` names the image of a batch in that error)."""
    tensor = image.cpu() if isinstance(image, Tensor) else torch.from_numpy(np.array(image))
    check_image_values(tensor, index)
    if tensor.ndim != 3 or 3 not in (tensor.shape[0], tensor.shape[-1]):
        raise ValueError(f"expected an RGB image [3, H, W] or [H, W, 3], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != 3:
        tensor = tensor.permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def resize_with_pad(images: Tensor, size: int) -> Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, size, size]: aspect-preserving bilinear resize, centred zero padding.

    The smaller margin goes top/left, the extra pixel bottom/right (LeRobot's ``resize_with_pad_torch``).
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    ratio = max(width / size, height / size)
    new_height, new_width = int(height / ratio), int(width / ratio)
    resized = F.interpolate(images, size=(new_height, new_width), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    return F.pad(resized, (left, size - new_width - left, top, size - new_height - top), value=0.0)


class Pi05ImageProcessor(BaseImageProcessor):
    """Stacks the cameras of ``camera_keys`` (in that order) at ``image_size``; see the module docstring."""

    model_input_names = ["pixel_values", "image_masks"]

    def __init__(self, image_size: int = 224, camera_keys: Sequence[str] = ("observation.image",), **kwargs: Any):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.camera_keys = list(camera_keys)

    def preprocess(self, images: Any, return_tensors: str | None = "pt") -> BatchFeature:
        """``images``: a dict ``{camera_key: batch}`` (a batch is a [B, ...] tensor/array or a list of B images) or
        a list with one entry per sample (an image for the first camera, a list of images in camera order, or a
        dict ``{camera_key: image}``). ``None`` or an absent key marks a missing camera. Tensors are always torch."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"Pi05ImageProcessor returns torch tensors only, not return_tensors={return_tensors!r}")
        per_camera = self._by_camera(images)
        sizes = {len(samples) for samples in per_camera.values()}
        if len(sizes) != 1:
            counts = {key: len(samples) for key, samples in per_camera.items()}
            raise ValueError(f"cameras hold different numbers of images: {counts}")
        batch = sizes.pop()
        check_batch(batch)
        size = self.image_size
        pixel_values = torch.full((batch, len(self.camera_keys), 3, size, size), -1.0)
        image_masks = torch.zeros(batch, len(self.camera_keys), dtype=torch.bool)
        for index, key in enumerate(self.camera_keys):
            samples = per_camera.get(key, [None] * batch)
            present = [i for i, image in enumerate(samples) if image is not None]
            if not present:
                continue
            chw = [to_float_chw(samples[i], i) for i in present]
            shapes = {image.shape for image in chw}
            resized = (
                resize_with_pad(torch.stack(chw), size)
                if len(shapes) == 1
                else torch.cat([resize_with_pad(image[None], size) for image in chw])
            )
            pixel_values[present, index] = resized * 2.0 - 1.0
            image_masks[present, index] = True
        return BatchFeature({"pixel_values": pixel_values, "image_masks": image_masks})

    def _by_camera(self, images: Any) -> dict[str, list[ImageLike | None]]:
        """Normalise the accepted layouts to ``{camera_key: [one entry per sample]}``."""
        if isinstance(images, Mapping):
            unknown = sorted(set(images) - set(self.camera_keys))
            if unknown:
                raise ValueError(f"unknown camera(s) {unknown}; this model's camera_keys are {self.camera_keys}")
            return {key: _samples(batch) for key, batch in images.items()}
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            images = [images]
        per_camera: dict[str, list[ImageLike | None]] = {key: [] for key in self.camera_keys}
        for sample in images:
            if isinstance(sample, Mapping):
                unknown = sorted(set(sample) - set(self.camera_keys))
                if unknown:
                    raise ValueError(f"unknown camera(s) {unknown}; this model's camera_keys are {self.camera_keys}")
                views = [sample.get(key) for key in self.camera_keys]
            else:
                views = list(sample) if isinstance(sample, (list, tuple)) else [sample]
                if len(views) > len(self.camera_keys):
                    raise ValueError(f"{len(views)} images for one sample but only {len(self.camera_keys)} camera_keys")
                views += [None] * (len(self.camera_keys) - len(views))
            for key, view in zip(self.camera_keys, views, strict=True):
                per_camera[key].append(view)
        return per_camera


def _samples(batch: Any) -> list[ImageLike | None]:
    """A camera's batch as a list of per-sample images; a single image (3 dims, or PIL) is a batch of one."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if isinstance(batch, (Tensor, np.ndarray)):
        return list(batch) if batch.ndim == 4 else [batch]
    return [batch]
