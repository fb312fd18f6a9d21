"""Configuration of pi0.5 and pi0: a PaliGemma VLM (SigLIP + Gemma) plus a Gemma action expert trained by flow matching.

Every size is an explicit field, so a model of any size builds from the config alone; the defaults are
lerobot/pi05_base's (SigLIP so400m/14 at 224 px, gemma_2b VLM, gemma_300m expert). ``pi05=False`` gives pi0:
the state enters as a continuous suffix token, time is fused into the action tokens, there is no adaRMS, the
prompt is the bare task (48 tokens) and normalisation is mean/std.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...data.normalize import NORM_MODES
from .lerobot_format import is_lerobot_config, pi05_kwargs_from_lerobot, read_lerobot_norm_stats

# lerobot/pi05_base's cameras, in its config.json order.
PI05_BASE_CAMERAS = [
    "observation.images.base_0_rgb",
    "observation.images.left_wrist_0_rgb",
    "observation.images.right_wrist_0_rgb",
]

# Modules LeRobot keeps in float32 when the rest of the model runs in bfloat16 (its `params_to_keep_float32`,
# plus the flow-matching projections, which live outside the bfloat16 cast). Matched as substrings of names.
FLOAT32_MODULES = [
    "vision_tower",
    "multi_modal_projector",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
    "action_in_proj",
    "action_out_proj",
    "time_mlp_in",
    "time_mlp_out",
    "state_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
]

# Tiny models for tests and the CPU demo. The sizes are those of the monkeypatched LeRobot reference the parity
# tests build (see tests/lerobot_pi05_reference.py), so the same dict describes both.
TINY_PI05_CONFIG: dict[str, Any] = {
    "pi05": True,
    "vlm_width": 128,
    "vlm_depth": 2,
    "vlm_mlp_dim": 256,
    "expert_width": 64,
    "expert_depth": 2,
    "expert_mlp_dim": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 128,
    "vision_width": 32,
    "vision_depth": 2,
    "vision_num_heads": 2,
    "vision_mlp_dim": 64,
    "image_size": 224,
    "camera_keys": ["observation.images.cam0", "observation.images.cam1"],
    "action_dim": 7,
    "state_dim": 8,
    "action_horizon": 10,
}
TINY_PI0_CONFIG: dict[str, Any] = {**TINY_PI05_CONFIG, "pi05": False}


class Pi05Config(PretrainedConfig):
    """Hyper-parameters of :class:`Pi05ForActionPrediction` and what its processor needs to match it.

    ``norm_stats`` uses OpenVLA's ``dataset_statistics.json`` layout (``{dataset: {"action": {...}, "proprio":
    {...}}}``) so a saved model carries the statistics that turn its outputs back into dataset units.
    ``tokenizer_max_length`` and ``norm_mode`` default to the variant's values (200 / quantiles for pi0.5,
    48 / mean_std for pi0).
    """

    model_type = "pi05"
    # DeepSpeed's "auto" bucket sizes and other generic tooling read `hidden_size`.
    attribute_map = {"hidden_size": "vlm_width"}

    def __init__(
        self,
        pi05: bool = True,
        camera_keys: list[str] | None = None,
        action_dim: int = 32,
        state_dim: int = 32,
        max_action_dim: int = 32,
        max_state_dim: int = 32,
        action_horizon: int = 50,
        num_inference_steps: int = 10,
        tokenizer_max_length: int | None = None,
        image_size: int = 224,
        norm_mode: str | None = None,
        norm_stats: dict[str, Any] | None = None,
        relative_action_mask: list[bool] | None = None,
        vlm_width: int = 2048,
        vlm_depth: int = 18,
        vlm_mlp_dim: int = 16_384,
        expert_width: int = 1024,
        expert_depth: int = 18,
        expert_mlp_dim: int = 4096,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 1,
        head_dim: int = 256,
        vocab_size: int = 257_152,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10_000.0,
        vision_width: int = 1152,
        vision_depth: int = 27,
        vision_num_heads: int = 16,
        vision_mlp_dim: int = 4304,
        patch_size: int = 14,
        vision_layer_norm_eps: float = 1e-6,
        time_beta_alpha: float = 1.5,
        time_beta_beta: float = 1.0,
        time_scale: float = 0.999,
        time_offset: float = 0.001,
        min_period: float = 4e-3,
        max_period: float = 4.0,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.pi05 = pi05
        self.camera_keys = list(camera_keys) if camera_keys is not None else list(PI05_BASE_CAMERAS)
        self.action_dim = action_dim
        self.state_dim = state_dim
        self.max_action_dim = max_action_dim
        self.max_state_dim = max_state_dim
        self.action_horizon = action_horizon
        self.num_inference_steps = num_inference_steps
        self.tokenizer_max_length = tokenizer_max_length or (200 if pi05 else 48)
        self.image_size = image_size
        self.norm_mode = norm_mode or ("quantiles" if pi05 else "mean_std")
        self.norm_stats = norm_stats
        self.relative_action_mask = list(relative_action_mask) if relative_action_mask is not None else None
        self.vlm_width = vlm_width
        self.vlm_depth = vlm_depth
        self.vlm_mlp_dim = vlm_mlp_dim
        self.expert_width = expert_width
        self.expert_depth = expert_depth
        self.expert_mlp_dim = expert_mlp_dim
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.vision_width = vision_width
        self.vision_depth = vision_depth
        self.vision_num_heads = vision_num_heads
        self.vision_mlp_dim = vision_mlp_dim
        self.patch_size = patch_size
        self.vision_layer_norm_eps = vision_layer_norm_eps
        self.time_beta_alpha = time_beta_alpha
        self.time_beta_beta = time_beta_beta
        self.time_scale = time_scale
        self.time_offset = time_offset
        self.min_period = min_period
        self.max_period = max_period
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Fail at construction, with the field to fix, rather than deep inside a forward."""
        checks = [
            (self.vlm_depth == self.expert_depth, "vlm_depth and expert_depth must be equal (they run layer by layer)"),
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (self.expert_width % 2 == 0, "expert_width must be even (sine/cosine time embedding)"),
            (0 < self.action_dim <= self.max_action_dim, "action_dim must be in 1..max_action_dim"),
            (0 < self.state_dim <= self.max_state_dim, "state_dim must be in 1..max_state_dim"),
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (len(self.camera_keys) > 0, "camera_keys must name at least one camera"),
            (len(set(self.camera_keys)) == len(self.camera_keys), "camera_keys must not repeat a camera"),
            (self.norm_mode in NORM_MODES, f"norm_mode must be one of {', '.join(NORM_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Pi05Config: {message}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        """Also accept a LeRobot ``config.json`` (``"type": "pi05"`` or ``"pi0"``, no ``model_type``)."""
        if is_lerobot_config(config_dict):
            config_dict = pi05_kwargs_from_lerobot(config_dict)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        """Read ``config.json``; for a LeRobot folder also pick up its normaliser statistics as ``norm_stats``."""
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if is_lerobot_config(config_dict):
            config_dict = pi05_kwargs_from_lerobot(config_dict)
            config_dict["norm_stats"] = read_lerobot_norm_stats(pretrained_model_name_or_path, **kwargs)
        return config_dict, unused

    @classmethod
    def from_lerobot_config(cls, lerobot_config: dict[str, Any], **overrides: Any) -> Pi05Config:
        """Build from a LeRobot ``PI05Config`` / ``PI0Config`` dict; ``overrides`` win (e.g. sizes, norm_stats)."""
        return cls(**{**pi05_kwargs_from_lerobot(lerobot_config), **overrides})
