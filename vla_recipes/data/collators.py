"""Data collators: a list of ``VLADataset`` samples -> the tensors a model's forward takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_recipes.data.normalize import normalize
from vla_recipes.models.openvla.processing_openvla import build_prompt

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

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        images = [s["images"][0] for s in samples]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        prompts = [build_prompt(s["task"]) for s in samples]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]

        actions = normalize(torch.stack([s["actions"] for s in samples]).double(), self.action_stats, self.norm_mode)
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


@dataclass
class FlowMatchingDataCollator:
    """pi0.5 / pi0 batches: the processor's image, prompt (and pi0 state) tensors plus normalised action chunks.

    Actions are normalised with the processor's statistics (the model config's), so training sees exactly
    what ``predict_action`` un-normalises; ``action_is_pad`` marks chunk steps past an episode's end.
    """

    processor: object  # Pi05Processor

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            images=[s["images"] for s in samples],
            text=[s["task"] for s in samples],
            state=torch.stack([s["state"] for s in samples]),
        )
        actions = torch.stack([s["actions"] for s in samples]).float()
        return {
            **inputs,
            "actions": self.processor.normalize_actions(actions),
            "action_is_pad": torch.stack([s["action_is_pad"] for s in samples]),
        }
