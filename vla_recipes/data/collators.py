"""Data collators: a list of ``VLADataset`` samples -> the tensors a model's forward takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_recipes.data.normalize import normalize
from vla_recipes.data.relative_actions import to_relative
from vla_recipes.models.openvla.processing_openvla import build_prompt
from vla_recipes.models.pi05.flow_matching import sample_noise, sample_time

IGNORE_INDEX = -100


@dataclass
class OpenVLADataCollator:
    """OpenVLA's training sequence: ``<s> In: What action ...?\\nOut: ▁`` + action tokens + ``</s>``.

    Labels are -100 everywhere but the action tokens and the EOS (OpenVLA's ``predict_stop_token``),
    and also -100 on the tokens of chunk steps padded past an episode's end. Sequences are padded on
    the right with the tokenizer's pad id, as OpenVLA's ``PaddedCollatorForActionPrediction`` does.
    Action tokens are written as ids directly (no decode/re-encode round trip): the same ids the
    reference's ``tokenizer(prompt + action_string + "</s>")`` yields.
    """

    processor: object  # OpenVLAProcessor
    action_tokenizer: object  # ActionTokenizer
    action_stats: dict
    norm_mode: str = "bounds_q99"
    norm_stats: dict | None = None  # a mixture's: a sample's "dataset" picks its action statistics

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        images = [s["images"][0] for s in samples]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        prompts = [build_prompt(s["task"]) for s in samples]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]

        actions = torch.stack([normalize(s["actions"].double(), self._stats(s), self.norm_mode) for s in samples])
        action_ids = torch.as_tensor(self.action_tokenizer.encode(actions.numpy()))  # (B, H, D)
        is_pad = torch.stack([s["action_is_pad"] for s in samples])[..., None].expand_as(action_ids)
        action_labels = action_ids.masked_fill(is_pad, IGNORE_INDEX)

        eos = torch.tensor([tokenizer.eos_token_id])
        ids = [torch.cat([torch.tensor(p), a.flatten(), eos]) for p, a in zip(prompt_ids, action_ids, strict=True)]
        labels = [
            torch.cat([torch.full((len(p),), IGNORE_INDEX), a.flatten(), eos])
            for p, a in zip(prompt_ids, action_labels, strict=True)
        ]
        pad = torch.nn.utils.rnn.pad_sequence
        return {
            "input_ids": pad(ids, batch_first=True, padding_value=tokenizer.pad_token_id),
            "attention_mask": pad([torch.ones(len(x), dtype=torch.bool) for x in ids], batch_first=True),
            "pixel_values": pixel_values,
            "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }

    def _stats(self, sample: dict) -> dict:
        return self.norm_stats[sample["dataset"]]["action"] if "dataset" in sample else self.action_stats


@dataclass
class FlowMatchingDataCollator:
    """pi0.5 / pi0 batches: the processor's image, prompt (and pi0 state) tensors plus normalised action chunks.

    Actions are normalised with the processor's statistics (the model config's), so training sees exactly
    what ``predict_action`` un-normalises; ``action_is_pad`` marks chunk steps past an episode's end. With the
    processor's ``relative_action_mask`` (``relative_actions``) they are first made relative to the sample's state,
    in float64, and the processor's ``reference_state`` (for ``predict_action``) is dropped.

    Given the model ``config``, each sample's flow-matching ``noise`` and ``time`` are drawn here with the model's
    own sampling, seeded by the sample's ``seed`` (``VLADataset``), instead of by the model from the global RNG
    per batch: the loss then does not depend on how samples are split into processes, micro-batches or workers
    (2 processes x batch 4 train exactly as 1 x batch 8), and evaluation losses are reproducible.
    """

    processor: object  # Pi05Processor
    config: object | None = None  # Pi05Config

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        groups: dict[str | None, list[int]] = {}  # a mixture's samples, by dataset: each with its own statistics
        for i, sample in enumerate(samples):
            groups.setdefault(sample.get("dataset"), []).append(i)
        parts = [self._collate([samples[i] for i in rows], name) for name, rows in groups.items()]
        order = torch.argsort(torch.tensor([i for rows in groups.values() for i in rows]))
        batch = {key: torch.cat([part[key] for part in parts])[order] for key in parts[0]}
        batch["action_is_pad"] = torch.stack([s["action_is_pad"] for s in samples])
        if self.config is not None and all("seed" in s for s in samples):
            batch["noise"], batch["time"] = self.noise_and_time([s["seed"] for s in samples])
        return batch

    def _collate(self, samples: list[dict], unnorm_key: str | None) -> dict[str, torch.Tensor]:
        """The processor's tensors and the normalised (relative, if so trained) actions of one dataset's samples."""
        state = torch.stack([s["state"] for s in samples])
        images, tasks = [s["images"] for s in samples], [s["task"] for s in samples]
        inputs = dict(self.processor(images=images, text=tasks, state=state, unnorm_key=unnorm_key))
        inputs.pop("reference_state", None)
        actions = torch.stack([s["actions"] for s in samples])
        if (mask := getattr(self.processor, "relative_action_mask", None)) is not None:
            actions = to_relative(actions.double(), state.double(), mask)
        return inputs | {"actions": self.processor.normalize_actions(actions.float(), unnorm_key)}

    def noise_and_time(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample noise [B, horizon, max_action_dim] and time [B], the global RNG left untouched."""
        shape = (1, self.config.action_horizon, self.config.max_action_dim)
        noise, time = [], []
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.manual_seed(seed)
                noise.append(sample_noise(shape, torch.device("cpu")))
                time.append(sample_time(1, torch.device("cpu"), self.config))
        return torch.cat(noise), torch.cat(time)


@dataclass
class OpenVLAOFTDataCollator:
    """OpenVLA-OFT batches: the processor's prompt and camera tensors, the raw robot state (the model normalises
    it) and the action chunks normalised with the model's statistics, the L1 loss's targets; ``action_is_pad``
    marks chunk steps past an episode's end (left out of the loss)."""

    processor: object  # OpenVLAOFTProcessor
    action_stats: dict
    norm_mode: str = "bounds_q99"

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        states = [s["state"] for s in samples]
        inputs = self.processor(
            images=[s["images"] for s in samples],
            text=[s["task"] for s in samples],
            state=torch.stack(states) if all(state is not None for state in states) else None,
        )
        actions = normalize(torch.stack([s["actions"] for s in samples]).double(), self.action_stats, self.norm_mode)
        return {
            **inputs,
            "actions": actions.float(),
            "action_is_pad": torch.stack([s["action_is_pad"] for s in samples]),
        }
