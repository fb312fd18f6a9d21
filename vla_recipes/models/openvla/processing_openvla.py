"""OpenVLA's image processor and processor (instruction -> prompt -> token ids; image -> pixel_values; for training,
action chunks -> normalised -> action tokens and labels).

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
from transformers import AutoTokenizer, BatchFeature, PretrainedConfig, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

from ...data.normalize import Normalizer
from ..input_checks import check_batch, check_image_values, check_tasks
from .action_tokenizer import ActionTokenizer
from .configuration_openvla import OpenVLAConfig

DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IGNORE_INDEX = -100  # labels the loss skips (transformers' and OpenVLA's)


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
    """``processor(images=[[image], ...], text=instructions)`` -> right-padded input_ids, attention_mask and
    pixel_values; with ``actions=`` (training) the sequence goes on with the action tokens and EOS, and ``labels``.

    The call shape is every family's: ``images`` one list of camera images per sample (OpenVLA sees one camera, so
    a bare image per sample is taken too), ``text``, ``state`` (OpenVLA sees none: ignored), ``actions`` and
    ``action_is_pad`` [B, horizon(, action_dim)] for training, ``unnorm_key`` one dataset or one per sample.
    Actions are normalised with the model config's statistics (:meth:`set_model_config`; ``from_pretrained`` reads
    the folder's config), the one place they are stored."""

    model_config_class: type[PretrainedConfig] = OpenVLAConfig  # the config whose statistics from_pretrained reads

    def __init__(
        self,
        image_processor: OpenVLAImageProcessor | None = None,
        tokenizer: Any = None,
        n_action_bins: int = 256,
        **kwargs: Any,
    ):
        self.n_action_bins = n_action_bins
        self.normalizer: Normalizer | None = None
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config: OpenVLAConfig, tokenizer: Any) -> OpenVLAProcessor:
        """The processor matching a model: its image size and backbones, action bins and statistics."""
        processor = cls(OpenVLAImageProcessor.for_model(config), tokenizer, n_action_bins=config.n_action_bins)
        processor.set_model_config(config)
        return processor

    def set_model_config(self, config: Any) -> None:
        """Read the statistics from the model's config (their one store), e.g. the config a run fine-tunes with."""
        self.normalizer = Normalizer.from_config(config)

    def require_normalizer(self) -> Normalizer:
        if self.normalizer is None:
            raise ValueError(
                f"{type(self).__name__} has no statistics to normalise with: build it with from_model_config(config) "
                "or from_pretrained(folder), or call set_model_config(config)"
            )
        return self.normalizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> OpenVLAProcessor:
        """Also reads the published openvla/openvla-7b layout as it is: its tokenizer, its image means/stds and the
        image size of its config (no remote code, no conversion). The statistics come from the folder's config."""
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        published = published_preprocessor_config(pretrained_model_name_or_path, **hub_kwargs)
        if published is None:
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            lookup = {**hub_kwargs, "_raise_exceptions_for_missing_entries": False}
            if cached_file(pretrained_model_name_or_path, CONFIG_NAME, **lookup) is not None:  # else processor-only
                config = cls.model_config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
                processor.set_model_config(config)
            return processor
        config = OpenVLAConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        for pointer in ("auto_map", "processor_class"):  # prismatic's remote processor, not in a folder we save
            tokenizer.init_kwargs.pop(pointer, None)
        image_processor = OpenVLAImageProcessor.for_model(config)
        image_processor.means = published.get("means", image_processor.means)
        image_processor.stds = published.get("stds", image_processor.stds)
        processor = cls(image_processor, tokenizer, n_action_bins=config.n_action_bins)
        processor.set_model_config(config)
        return processor

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        state: Any = None,
        actions: Any = None,
        action_is_pad: Any = None,
        unnorm_key: str | list[str | None] | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        if images is None or text is None:
            raise ValueError("OpenVLAProcessor needs images= and text= (the instruction, one per image)")
        instructions = [text] if isinstance(text, str) else list(text)
        data = self.encode_prompts(one_camera(images), instructions, **kwargs)
        if actions is not None:
            data = self.append_action_tokens(data, actions, action_is_pad, unnorm_key)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_prompts(self, images: Any, instructions: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        """One image and one instruction per row -> right-padded ``input_ids``, ``attention_mask``; ``pixel_values``."""
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
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}

    def normalize_actions(
        self, actions: Any, unnorm_key: str | list[str | None] | None = None, state: Any = None
    ) -> torch.Tensor:
        """Dataset-unit action chunks [B, horizon, action_dim] -> normalised (float64), each sample with its
        dataset's statistics (relative to the raw ``state`` first, for a model trained on relative actions)."""
        return self.require_normalizer().actions_to_model(torch.as_tensor(actions).double(), state, unnorm_key)

    def append_action_tokens(
        self, data: dict, actions: Any, action_is_pad: Any, unnorm_key: str | list[str | None] | None
    ) -> dict[str, torch.Tensor]:
        """OpenVLA's training sequence: ``<s> In: What action ...?\nOut: ▁`` + action tokens + ``</s>``.

        Labels are -100 everywhere but the action tokens and the EOS (OpenVLA's ``predict_stop_token``), and also
        -100 on the tokens of chunk steps padded past an episode's end (``action_is_pad``). Sequences are padded on
        the right with the tokenizer's pad id, as OpenVLA's ``PaddedCollatorForActionPrediction`` does. Action
        tokens are written as ids directly (no decode/re-encode round trip): the same ids the reference's
        ``tokenizer(prompt + action_string + "</s>")`` yields."""
        action_tokenizer = ActionTokenizer(self.tokenizer, bins=self.n_action_bins)
        action_ids = torch.as_tensor(action_tokenizer.encode(self.normalize_actions(actions, unnorm_key).numpy()))
        is_pad = torch.zeros(action_ids.shape[:2], dtype=torch.bool) if action_is_pad is None else action_is_pad
        action_labels = action_ids.masked_fill(torch.as_tensor(is_pad)[..., None].expand_as(action_ids), IGNORE_INDEX)
        eos = torch.tensor([self.tokenizer.eos_token_id])
        prompt_ids = [row[mask.bool()] for row, mask in zip(data["input_ids"], data["attention_mask"], strict=True)]
        ids = [torch.cat([p, a.flatten(), eos]) for p, a in zip(prompt_ids, action_ids, strict=True)]
        labels = [
            torch.cat([torch.full((len(p),), IGNORE_INDEX), a.flatten(), eos])
            for p, a in zip(prompt_ids, action_labels, strict=True)
        ]
        pad = torch.nn.utils.rnn.pad_sequence
        return {
            "input_ids": pad(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id),
            "attention_mask": pad([torch.ones(len(x), dtype=torch.bool) for x in ids], batch_first=True),
            "pixel_values": data["pixel_values"],
            "labels": pad(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }


def one_camera(images: Any) -> Any:
    """Per sample, a list holding one camera image (the call shape of every family) or the image itself -> the
    images; a sample with several cameras is refused (OpenVLA sees one)."""
    if not isinstance(images, (list, tuple)):
        return images
    out = []
    for i, cams in enumerate(images):
        if isinstance(cams, (list, tuple)):
            if len(cams) != 1:
                raise ValueError(f"sample {i} has {len(cams)} camera images; OpenVLA sees one camera per sample")
            cams = cams[0]
        out.append(cams)
    return out
