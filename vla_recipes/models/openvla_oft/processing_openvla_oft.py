"""OpenVLA-OFT's processor: OpenVLA's prompt and image transform, several cameras per sample, the robot state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from ..input_checks import check_state_values

# Imported for a remote-code folder, which transformers copies one import level deep (see modeling_openvla_oft).
from ..openvla.configuration_openvla import OpenVLAConfig  # noqa: F401
from ..openvla.processing_openvla import OpenVLAProcessor


class OpenVLAOFTProcessor(OpenVLAProcessor):
    """``processor(images=[[cam_1, cam_2, ...], ...], text=tasks, state=states)`` -> ``input_ids``,
    ``attention_mask``, ``pixel_values`` [B, 6 * cameras, S, S] (each camera's DINOv2 + SigLIP channels, in
    camera order, as openvla-oft stacks them) and ``state`` [B, state_dim] in the dataset's units (the model
    normalises it with the statistics saved in its config)."""

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        state: Any = None,
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
        inputs = super().__call__(
            images=[image for cams in per_sample for image in cams],
            text=[t for t in ([text] if isinstance(text, str) else text) for _ in range(n_cameras)],
            return_tensors=return_tensors,
            **kwargs,
        )
        pixels = inputs["pixel_values"]
        data = {
            "input_ids": inputs["input_ids"][::n_cameras],
            "attention_mask": inputs["attention_mask"][::n_cameras],
            "pixel_values": pixels.reshape(len(per_sample), n_cameras * pixels.shape[1], *pixels.shape[2:]),
        }
        if state is not None:
            state = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(len(per_sample), -1)
            check_state_values(state)
            data["state"] = state
        return BatchFeature(data=data, tensor_type=return_tensors)
