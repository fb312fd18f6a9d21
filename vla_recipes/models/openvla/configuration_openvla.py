"""Configuration of OpenVLA (Prismatic DINOv2 + SigLIP -> MLP projector -> Llama 2, actions as tokens).

The defaults are openvla/openvla-7b. Each vision backbone is described by the keyword arguments of timm's
``VisionTransformer`` (timm's ViT has exactly openvla-7b's parameter layout), so tiny models for tests are
plain dicts. openvla-7b's own ``config.json`` fields (``timm_model_ids``, ``image_sizes``, ...) are accepted
too: the vision configs are then derived from the timm ids, which is how a downloaded checkpoint loads.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

# timm's registered configs (``vit_large_patch14_reg4_dinov2``, ``vit_so400m_patch14_siglip_224``), img_size
# set as openvla-7b sets it. SigLIP's MLP width is int(1152 * 3.7362) = 4304.
DINOV2_VIT_L14_REG4: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "init_values": 1e-5,
    "reg_tokens": 4,
    "no_embed_class": True,
}
SIGLIP_SO400M_14: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 14,
    "embed_dim": 1152,
    "depth": 27,
    "num_heads": 16,
    "mlp_ratio": 3.7362,
    "class_token": False,
    "global_pool": "map",
}
TIMM_VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_large_patch14_reg4_dinov2": DINOV2_VIT_L14_REG4,
    "vit_so400m_patch14_siglip_224": SIGLIP_SO400M_14,
    "vit_so400m_patch14_siglip_384": SIGLIP_SO400M_14,
}

# A tiny random OpenVLA for tests, the demo and benchmarks (64 patches, 2-layer Llama, the char tokenizer's
# vocabulary 355 + 64). Every Linear input width is a multiple of 64 so bitsandbytes' 4-bit CPU kernels take it.
TINY_OPENVLA_CONFIG: dict[str, Any] = {
    "featurizer_config": {**DINOV2_VIT_L14_REG4, "img_size": 112, "embed_dim": 64, "depth": 2, "num_heads": 2},
    "fused_featurizer_config": {
        **SIGLIP_SO400M_14,
        "img_size": 112,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 4.0,
    },
    "text_config": {
        "model_type": "llama",
        "vocab_size": 355 + 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "pad_token_id": 355,
    },
    "pad_token_id": 355,
    "pad_to_multiple_of": 64,
    "action_dim": 7,
    "action_horizon": 1,
}


def vit_config_from_timm(model_id: str, img_size: int, act_layer: str | None = None) -> dict[str, Any]:
    """VisionTransformer kwargs for a timm id of openvla's config.json (``"<arch>[.<pretrained tag>]"``)."""
    arch = model_id.split(".")[0]
    if arch not in TIMM_VIT_CONFIGS:
        raise ValueError(f"timm model {model_id!r} is not supported; known: {', '.join(TIMM_VIT_CONFIGS)}")
    config = {**TIMM_VIT_CONFIGS[arch], "img_size": img_size}
    if act_layer is not None:
        config["act_layer"] = act_layer
    return config


class OpenVLAConfig(PreTrainedConfig):
    """OpenVLA: vision featurizer(s), projector and causal LM; actions are ``n_action_bins`` LM tokens.

    Token convention (as openvla-7b): ``text_config.vocab_size = tokenizer.vocab_size + pad_to_multiple_of``,
    and the action bins count down from ``tokenizer_vocab_size = text_config.vocab_size - pad_to_multiple_of``.
    ``action_horizon > 1`` generates ``action_horizon * action_dim`` tokens (an OpenVLA-OFT-style chunk).
    """

    model_type = "openvla"
    sub_configs = {"text_config": AutoConfig}

    featurizer_config: dict | None = None
    fused_featurizer_config: dict | None = None
    use_fused_vision_backbone: bool = True
    text_config: dict | PreTrainedConfig | None = None
    n_action_bins: int = 256
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    action_dim: int = 7
    action_horizon: int = 1
    norm_mode: str = "bounds_q99"
    norm_stats: dict | None = None
    camera_keys: list[str] | None = None
    tie_word_embeddings: bool = False
    # Fields of openvla-7b's config.json: the three below derive the vision configs when those are absent;
    # the rest (vision_backbone_id, llm_backbone_id, arch_specifier, ...) are kept as given, informational.
    timm_model_ids: list[str] | None = None
    timm_override_act_layers: list[str | None] | None = None
    image_sizes: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Copies, so that editing one config never edits TINY_OPENVLA_CONFIG or another model's config.
        self.featurizer_config = copy.deepcopy(
            self.featurizer_config or self._timm_vit_config(0) or DINOV2_VIT_L14_REG4
        )
        if self.use_fused_vision_backbone:
            self.fused_featurizer_config = copy.deepcopy(
                self.fused_featurizer_config or self._timm_vit_config(1) or SIGLIP_SO400M_14
            )
        if isinstance(self.text_config, dict):
            text_config = {"model_type": "llama", **self.text_config}
            self.text_config = CONFIG_MAPPING[text_config.pop("model_type")](**text_config)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["llama"](vocab_size=32000 + 64, pad_token_id=32000)
        super().__post_init__(**kwargs)
        # openvla-7b's config.json points at its prismatic remote code: a folder saved from this config has ours.
        if any("prismatic" in str(ref) for ref in (getattr(self, "auto_map", None) or {}).values()):
            del self.auto_map

    def _timm_vit_config(self, index: int) -> dict[str, Any] | None:
        """The vision config derived from openvla's ``timm_model_ids`` (None when they are absent)."""
        if not self.timm_model_ids:
            return None
        act_layers = self.timm_override_act_layers or [None] * len(self.timm_model_ids)
        sizes = self.image_sizes or [224] * len(self.timm_model_ids)
        return vit_config_from_timm(self.timm_model_ids[index], sizes[index], act_layers[index])

    @property
    def image_size(self) -> int:
        """Side of the square input image (both backbones see the same resize)."""
        return int(self.featurizer_config["img_size"])

    @property
    def num_patches(self) -> int:
        """Image tokens inserted after BOS (256 for openvla-7b)."""
        return (self.image_size // int(self.featurizer_config["patch_size"])) ** 2

    @property
    def tokenizer_vocab_size(self) -> int:
        """``V``, the base vocabulary size the action ids count down from (32000 for openvla-7b)."""
        return self.text_config.vocab_size - self.pad_to_multiple_of
