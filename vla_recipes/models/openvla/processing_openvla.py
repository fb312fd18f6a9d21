"""OpenVLA's image processor and processor (instruction -> prompt -> token ids; image -> pixel_values).

Images follow ``prismatic/extern/hf/processing_prismatic.py`` ("resize-naive"): a PIL bicubic resize to a square
(no aspect kept), ``[0, 1]``, then each backbone's mean/std (DINOv2, then SigLIP), stacked on channels.
Every input kind goes through 8-bit PIL so that LeRobot's float frames (uint8 / 255) and camera frames
(uint8) give the same pixels as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

from ..input_checks import check_batch, check_image_values, check_tasks
from .configuration_openvla import OpenVLAConfig

DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt. The trailing space tokenises to Llama's lone ``▁`` (29871) that training puts
    before the action tokens, so training and inference prefixes are identical."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut: "


def to_pil(image: Any, index: int = 0) -> Image.Image:
    """PIL, numpy HWC (uint8 or float in [0, 1]) or torch CHW (uint8 or float in [0, 1]) -> RGB PIL image;
    ``index`` names the image of a batch in errors (NaN, or a float image outside [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"expected one RGB image (PIL, numpy HWC, torch CHW) per sample; got an array of shape {array.shape}"
        )
    if np.issubdtype(array.dtype, np.floating):
        check_image_values(array, index)
        array = np.clip(np.round(array * 255.0), 0, 255)
    return Image.fromarray(array.astype(np.uint8))


def as_image_list(images: Any) -> list[Any]:
    """One image or a batch (list, or a 4-D array/tensor) -> a list of single images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


class OpenVLAImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` [B, 3 * n_backbones, S, S] float32 (6 channels for DINOv2 + SigLIP)."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        means: list[list[float]] | None = None,
        stds: list[list[float]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.means = [list(m) for m in (means or [DINOV2_MEAN, SIGLIP_MEAN])]
        self.stds = [list(s) for s in (stds or [DINOV2_STD, SIGLIP_STD])]

    @classmethod
    def for_model(cls, config: OpenVLAConfig) -> OpenVLAImageProcessor:
        """The image processor a model config expects: its image size, one mean/std per vision backbone."""
        n_backbones = 2 if config.use_fused_vision_backbone else 1
        return cls(
            image_size=config.image_size,
            means=[DINOV2_MEAN, SIGLIP_MEAN][:n_backbones],
            stds=[DINOV2_STD, SIGLIP_STD][:n_backbones],
        )

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        images = as_image_list(images)
        check_batch(len(images))
        pixel_values = torch.stack([self._one(image, i) for i, image in enumerate(images)])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _one(self, image: Any, index: int) -> torch.Tensor:
        resized = to_pil(image, index).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(self.means), torch.tensor(self.stds)
        return torch.cat([(pixels - m[:, None, None]) / s[:, None, None] for m, s in zip(mean, std, strict=True)])


# openvla/openvla-7b as published: its processor files name prismatic's remote code (``PrismaticProcessor``).
PUBLISHED_IMAGE_PROCESSOR = "PrismaticImageProcessor"


def published_preprocessor_config(path: Any, **hub_kwargs: Any) -> dict | None:
    """The ``preprocessor_config.json`` of a folder or Hub repo in the published openvla-7b layout, else None."""
    lookup = {**hub_kwargs, "_raise_exceptions_for_missing_entries": False}
    if cached_file(path, PROCESSOR_NAME, **lookup) is not None:
        return None  # saved by this package
    file = cached_file(path, IMAGE_PROCESSOR_NAME, **lookup)
    config = json.loads(Path(file).read_text()) if file else {}
    return config if config.get("image_processor_type") == PUBLISHED_IMAGE_PROCESSOR else None


class OpenVLAProcessor(ProcessorMixin):
    """``processor(images=..., text=instructions)`` -> right-padded input_ids, attention_mask and pixel_values."""

    def __init__(self, image_processor: OpenVLAImageProcessor | None = None, tokenizer: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> OpenVLAProcessor:
        """Also reads the published openvla/openvla-7b layout as it is: its tokenizer, its image means/stds and the
        image size of its config (no remote code, no conversion)."""
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        published = published_preprocessor_config(pretrained_model_name_or_path, **hub_kwargs)
        if published is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = OpenVLAConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        for pointer in ("auto_map", "processor_class"):  # prismatic's remote processor, not in a folder we save
            tokenizer.init_kwargs.pop(pointer, None)
        image_processor = OpenVLAImageProcessor.for_model(config)
        image_processor.means = published.get("means", image_processor.means)
        image_processor.stds = published.get("stds", image_processor.stds)
        return cls(image_processor, tokenizer)

    def __call__(
        self, images: Any = None, text: str | list[str] | None = None, return_tensors: str = "pt", **kwargs: Any
    ) -> BatchFeature:
        if images is None or text is None:
            raise ValueError("OpenVLAProcessor needs images= and text= (the instruction, one per image)")
        instructions = [text] if isinstance(text, str) else list(text)
        check_tasks(instructions)
        pixel_values = self.image_processor(images)["pixel_values"]
        if len(instructions) != pixel_values.shape[0]:
            raise ValueError(f"got {pixel_values.shape[0]} images for {len(instructions)} instructions; pass one each")
        tokens = self.tokenizer(
            [build_prompt(instruction) for instruction in instructions],
            **{"padding": True, "padding_side": "right", **kwargs},
            add_special_tokens=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        data = {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "pixel_values": pixel_values,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)
