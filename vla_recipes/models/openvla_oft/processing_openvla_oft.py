"""OpenVLA-OFT's processor: OpenVLA's prompt and image transform, several cameras per sample, the robot state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

# A remote-code folder is copied by transformers one import level deep from the module its auto_map names: the
# modules that processing_openvla imports are imported here too, so that they travel.
from ...data.normalize import Normalizer  # noqa: F401
from ..input_checks import check_state_values
from ..openvla.action_tokenizer import ActionTokenizer  # noqa: F401
from ..openvla.configuration_openvla import OpenVLAConfig  # noqa: F401
from ..openvla.processing_openvla import OpenVLAProcessor
from .configuration_openvla_oft import OpenVLAOFTConfig


class OpenVLAOFTProcessor(OpenVLAProcessor):
    """``processor(images=[[cam_1, cam_2, ...], ...], text=tasks, state=states)`` -> ``input_ids``,
    ``attention_mask``, ``pixel_values`` [B, 6 * cameras, S, S] (each camera's DINOv2 + SigLIP channels, in
    camera order, as openvla-oft stacks them) and ``state`` [B, state_dim] normalised with the model config's
    statistics. With ``actions=`` (training) also ``actions``, the L1 loss's normalised targets, and
    ``action_is_pad``; a mixture's samples (``unnorm_key`` one per sample) each use their dataset's statistics.
    A model trained on relative actions also gets ``reference_state``, the raw state ``predict_action`` adds back."""

    model_config_class = OpenVLAOFTConfig

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
            raise ValueError("OpenVLAOFTProcessor needs images= (a list of camera images per sample) and text=")
        per_sample = [list(cams) if isinstance(cams, (list, tuple)) else [cams] for cams in images]
        cameras = {len(cams) for cams in per_sample}
        if len(cameras) != 1:
            raise ValueError(f"every sample needs the same cameras; got {sorted(cameras)} images per sample")
        n_cameras = cameras.pop()
        inputs = self.encode_prompts(
            [image for cams in per_sample for image in cams],
            [t for t in ([text] if isinstance(text, str) else text) for _ in range(n_cameras)],
            **kwargs,
        )
        pixels = inputs["pixel_values"]
        data = {
            "input_ids": inputs["input_ids"][::n_cameras],
            "attention_mask": inputs["attention_mask"][::n_cameras],
            "pixel_values": pixels.reshape(len(per_sample), n_cameras * pixels.shape[1], *pixels.shape[2:]),
        }
        raw_state = None
        if state is not None:
            raw_state = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(len(per_sample), -1)
            check_state_values(raw_state)
            data["state"] = self._normalize_state(raw_state, unnorm_key)
        if actions is not None:
            data["actions"] = self.normalize_actions(actions, unnorm_key, raw_state).float()
            if action_is_pad is not None:
                data["action_is_pad"] = torch.as_tensor(action_is_pad)
        elif self.normalizer is not None and self.normalizer.relative_action_mask is not None:
            data["reference_state"] = raw_state
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _normalize_state(self, state: torch.Tensor, unnorm_key: str | list[str | None] | None) -> torch.Tensor:
        """The raw state (dataset units) -> what the proprio projector reads (float64; the model casts it)."""
        normalizer = self.require_normalizer()
        if not normalizer.has("proprio"):  # a model trained without state statistics reads it raw
            return state
        return normalizer.normalize(state.double(), "proprio", unnorm_key)
