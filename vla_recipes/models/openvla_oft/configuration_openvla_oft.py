"""Configuration of OpenVLA-OFT (Kim, Finn and Liang 2025): OpenVLA's backbone with OFT's fine-tuning recipe.

A class of its own (``model_type: openvla_oft``) rather than a flag on ``OpenVLAConfig``: an OFT model has other
modules (the L1 action head, the proprio projector), another forward (parallel decoding, an L1 loss on continuous
actions) and other inputs (several cameras, the robot state), so its state dict, trainer and processor differ.
Keyed by its own ``model_type``, AutoModel/AutoProcessor reload each kind of folder into the right class. The vision
backbone, projector and language model are OpenVLA's, key for key, so openvla/openvla-7b initialises it.
"""

from __future__ import annotations

from typing import Any

from ..openvla.configuration_openvla import TINY_OPENVLA_CONFIG, OpenVLAConfig

# The LIBERO settings of openvla-oft's ``prismatic/vla/constants.py``: NUM_ACTIONS_CHUNK 8, ACTION_DIM 7,
# PROPRIO_DIM 8; two cameras (third-person + wrist).
TINY_OPENVLA_OFT_CONFIG: dict[str, Any] = {**TINY_OPENVLA_CONFIG, "action_horizon": 8, "num_images": 2, "state_dim": 8}


class OpenVLAOFTConfig(OpenVLAConfig):
    """OpenVLA + OFT: ``action_horizon * action_dim`` placeholders decoded in one pass, an MLP head on their hidden
    states, ``num_images`` cameras through the fused backbone and (``state_dim`` set) one proprio token.

    ``action_head_hidden_dim``: the head's width (None: the LLM's hidden size, OFT's choice);
    ``action_head_num_blocks``: its residual MLP blocks (2 in OFT).
    """

    model_type = "openvla_oft"

    action_horizon: int = 8
    num_images: int = 1
    state_dim: int | None = None
    action_head_hidden_dim: int | None = None
    action_head_num_blocks: int = 2

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_images > 1 and not self.use_fused_vision_backbone:
            raise ValueError("OpenVLA-OFT takes several cameras only through the fused (DINOv2 + SigLIP) backbone")

    @property
    def num_action_tokens(self) -> int:
        """Placeholders the language model decodes in parallel: one per (chunk step, action dim)."""
        return self.action_horizon * self.action_dim

    @classmethod
    def from_openvla(cls, config: OpenVLAConfig, **changes: Any) -> OpenVLAOFTConfig:
        """An OFT config on the backbone of an OpenVLA one (e.g. openvla/openvla-7b's), ``changes`` applied."""
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
        return cls(**{**fields, **changes})
