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
from transformers.utils import CONFIG_NAME, cached_file

from ...data.normalize import Array, Normalizer
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
    (and ``state`` for pi0); with ``actions=`` (training) also the normalised (relative, if so trained) ``actions``
    and ``action_is_pad``. The statistics are the model config's, their one store: :meth:`from_model_config` and
    :meth:`set_model_config` take them from a config, ``from_pretrained`` from the folder's ``config.json``."""

    def __init__(
        self,
        image_processor: Pi05ImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        pi05: bool = True,
        max_length: int = 200,
    ) -> None:
        self.pi05 = pi05
        self.max_length = max_length
        self.normalizer: Normalizer | None = None
        super().__init__(image_processor=image_processor, tokenizer=tokenizer)

    @classmethod
    def from_model_config(cls, config: Pi05Config, tokenizer: PreTrainedTokenizerBase) -> Pi05Processor:
        """The processor matching a model: its cameras, image size, prompt length and statistics."""
        processor = cls(
            Pi05ImageProcessor(image_size=config.image_size, camera_keys=config.camera_keys),
            tokenizer,
            pi05=config.pi05,
            max_length=config.tokenizer_max_length,
        )
        processor.set_model_config(config)
        return processor

    def set_model_config(self, config: Pi05Config) -> None:
        """Read the statistics and the camera order from the model's config (e.g. the config a run fine-tunes with)."""
        self.normalizer = Normalizer.from_config(config)
        self.image_processor.camera_keys = list(config.camera_keys)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Pi05Processor:
        """The saved processor, with the statistics of the folder's model config."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        lookup = {**hub_kwargs, "_raise_exceptions_for_missing_entries": False}
        if cached_file(pretrained_model_name_or_path, CONFIG_NAME, **lookup) is not None:  # else processor-only
            processor.set_model_config(Pi05Config.from_pretrained(pretrained_model_name_or_path, **hub_kwargs))
        return processor

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        state: Array | list | None = None,
        actions: Array | None = None,
        action_is_pad: Array | None = None,
        unnorm_key: str | list[str | None] | None = None,
    ) -> BatchFeature:
        """``images``: see :meth:`Pi05ImageProcessor.preprocess`; ``text``: one task per sample; ``state``: the raw
        robot state [B, state_dim] in dataset units; ``actions``: raw action chunks [B, horizon, action_dim] (for
        training). ``unnorm_key`` picks the dataset's statistics, one for the batch or one per sample. A model trained
        on relative actions (``relative_action_mask``) also gets ``reference_state`` at inference, the raw state
        ``predict_action`` adds back to its output."""
        if images is None or text is None or state is None:
            raise ValueError("Pi05Processor needs images=, text= and state= (one task and one state per sample)")
        tasks = [text] if isinstance(text, str) else list(text)
        check_tasks(tasks)
        state = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(len(tasks), -1)
        check_state_values(state)
        raw_state = state
        normalizer = self.require_normalizer()
        state = normalizer.normalize(state, "proprio", unnorm_key)
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
        if actions is not None:
            actions = torch.as_tensor(np.asarray(actions, dtype=np.float32))
            data["actions"] = normalizer.actions_to_model(actions, raw_state, unnorm_key)
            if action_is_pad is not None:
                data["action_is_pad"] = torch.as_tensor(action_is_pad)
        elif normalizer.relative_action_mask is not None:
            data["reference_state"] = raw_state
        return BatchFeature(data)

    def require_normalizer(self) -> Normalizer:
        if self.normalizer is None:
            raise ValueError(
                "Pi05Processor has no statistics to normalise the state with: build it with from_model_config(config) "
                "or from_pretrained(folder), or call set_model_config(config)"
            )
        return self.normalizer

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
