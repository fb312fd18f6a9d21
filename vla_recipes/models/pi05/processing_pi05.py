"""Raw observations (camera images, robot state, task text) -> the tensors Pi05ForActionPrediction reads.

It reproduces LeRobot's pre-processing pipelines. pi0.5 normalises the state and writes it into the prompt as 256
bins, ``"Task: {task}, State: {bins};\\nAction: "``; pi0 keeps the prompt as the task plus a newline and hands the
normalised state to the model as a tensor. Prompts are tokenised with BOS, right-padded to ``max_length``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from ...data.normalize import Array, check_stats, normalize, select_stats
from ..input_checks import check_state_values, check_tasks
from .configuration_pi05 import Pi05Config
from .image_processing_pi05 import Pi05ImageProcessor

STATE_BINS = np.linspace(-1, 1, 256 + 1)[:-1]


def pi05_prompt(task: str, state_bins: np.ndarray) -> str:
    """openpi's pi0.5 prompt (LeRobot's ``Pi05PrepareStateTokenizerProcessorStep``)."""
    task = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {task}, State: {' '.join(map(str, state_bins))};\nAction: "


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalised state in [-1, 1] -> bin indices 0..255 (values below -1 give -1; nothing is clipped)."""
    return np.digitize(state, bins=STATE_BINS) - 1


class Pi05Processor(ProcessorMixin):
    """Images + task strings + robot state -> ``pixel_values``, ``image_masks``, ``input_ids``, ``attention_mask``
    (and ``state`` for pi0). ``norm_stats`` / ``norm_mode`` are the model config's, so a saved folder is complete."""

    def __init__(
        self,
        image_processor: Pi05ImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        pi05: bool = True,
        max_length: int = 200,
        norm_mode: str = "quantiles",
        norm_stats: dict[str, Any] | None = None,
        relative_action_mask: list[bool] | None = None,
        default_unnorm_key: str | None = None,
    ) -> None:
        self.pi05 = pi05
        self.relative_action_mask = relative_action_mask
        self.default_unnorm_key = default_unnorm_key  # a mixture's heaviest dataset
        self.max_length = max_length
        self.norm_mode = norm_mode
        self.norm_stats = norm_stats
        super().__init__(image_processor=image_processor, tokenizer=tokenizer)

    @classmethod
    def from_model_config(cls, config: Pi05Config, tokenizer: PreTrainedTokenizerBase) -> Pi05Processor:
        """The processor matching a model: its cameras, image size, prompt length and statistics."""
        return cls(
            Pi05ImageProcessor(image_size=config.image_size, camera_keys=config.camera_keys),
            tokenizer,
            pi05=config.pi05,
            max_length=config.tokenizer_max_length,
            norm_mode=config.norm_mode,
            norm_stats=config.norm_stats,
            relative_action_mask=getattr(config, "relative_action_mask", None),
            default_unnorm_key=getattr(config, "default_unnorm_key", None),
        )

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        state: Array | list | None = None,
        unnorm_key: str | None = None,
    ) -> BatchFeature:
        """``images``: see :meth:`Pi05ImageProcessor.preprocess`; ``text``: one task per sample; ``state``: the raw
        robot state [B, state_dim] in dataset units. ``unnorm_key`` picks the dataset's statistics. A model trained on
        relative actions (``relative_action_mask``) also gets ``reference_state``, the raw state ``predict_action``
        adds back to its output."""
        if images is None or text is None or state is None:
            raise ValueError("Pi05Processor needs images=, text= and state= (one task and one state per sample)")
        tasks = [text] if isinstance(text, str) else list(text)
        check_tasks(tasks)
        state = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(len(tasks), -1)
        check_state_values(state)
        raw_state = state
        state = self.normalize_feature(state, "proprio", unnorm_key)
        if self.pi05:
            bins = discretize_state(state.numpy())
            prompts = [pi05_prompt(task, row) for task, row in zip(tasks, bins, strict=True)]
        else:
            prompts = [task if task.endswith("\n") else f"{task}\n" for task in tasks]
        self.check_prompt_lengths(prompts)
        tokens = self.tokenizer(
            prompts,
            max_length=self.max_length,
            padding="max_length",
            padding_side="right",
            return_tensors="pt",
        )
        data = dict(self.image_processor(images))
        if data["pixel_values"].shape[0] != len(tasks):
            raise ValueError(f"{data['pixel_values'].shape[0]} samples of images but {len(tasks)} tasks")
        data.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"].bool())
        if not self.pi05:
            data["state"] = state
        if self.relative_action_mask is not None:
            data["reference_state"] = raw_state
        return BatchFeature(data)

    def check_prompt_lengths(self, prompts: list[str]) -> None:
        """Refuse a prompt longer than ``max_length`` tokens: cut, it would lose the state and the "Action:" the
        model acts on (or the end of the task), silently."""
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        if (longest := max(lengths)) > self.max_length:
            i = lengths.index(longest)
            raise ValueError(
                f"the prompt of sample {i} is {longest} tokens, more than the model's tokenizer_max_length="
                f"{self.max_length}; shorten the task"
            )

    def normalize_actions(self, actions: Array, unnorm_key: str | None = None) -> Array:
        """Dataset-unit actions [..., action_dim] -> what the model trains on (same type, dtype and device)."""
        return self.normalize_feature(actions, "action", unnorm_key)

    def normalize_feature(self, x: Array, feature: str, unnorm_key: str | None = None) -> Array:
        """Normalise ``x`` with one feature's statistics (``"action"`` or ``"proprio"``)."""
        if self.norm_mode == "identity":
            return x
        if not self.norm_stats:
            raise ValueError(f"norm_mode={self.norm_mode!r} needs norm_stats, which this processor does not have")
        stats = select_stats(self.norm_stats, unnorm_key or self.default_unnorm_key).get(feature, {})
        check_stats(stats, self.norm_mode, feature)
        dims = {len(value) for key, value in stats.items() if key != "mask"}
        if dims != {x.shape[-1]}:
            name = "state" if feature == "proprio" else feature
            raise ValueError(f"{name} has {x.shape[-1]} dims but the {feature!r} statistics have {sorted(dims)}")
        return normalize(x, stats, self.norm_mode)
