"""LeRobot's own pi0.5 / pi0 policies, built tiny on CPU: the reference of tests/test_pi05_parity.py.

LeRobot 0.6.1 builds only the real sizes (gemma_2b / gemma_300m, SigLIP so400m, vocab 257152) and loads the gated
PaliGemma tokenizer. The monkeypatches of /work/shared/references/pi05.md swap, module-globally and only for the
test's duration: the Gemma variant table (the names stay gemma_2b / gemma_300m, so its config.json still says so),
the HF configs of the VLM and of the expert just before construction, and the tokenizer loader. The weights are
then redrawn, because LeRobot's init zeroes the adaRMS dense layers, which would switch every expert residual off.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.processor import tokenizer_processor
from transformers import AutoTokenizer

from vla_recipes.models.pi05 import TINY_PI05_CONFIG

# Our config fields that LeRobot's config.json cannot express for the tiny model (it names the real variants).
SIZE_KEYS = (
    "vlm_width",
    "vlm_depth",
    "vlm_mlp_dim",
    "expert_width",
    "expert_depth",
    "expert_mlp_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "vision_width",
    "vision_depth",
    "vision_num_heads",
    "vision_mlp_dim",
)
TINY_SIZES = {key: TINY_PI05_CONFIG[key] for key in SIZE_KEYS}


@dataclass
class Reference:
    """A LeRobot policy with its pre/post-processors, saved LeRobot-style in ``folder``."""

    policy: Any
    preprocessor: Any
    postprocessor: Any
    folder: Path


def patch_lerobot_tiny(monkeypatch: pytest.MonkeyPatch, kind: str, tokenizer_dir: Path) -> Any:
    """Make LeRobot's ``kind`` ("pi05" or "pi0") modeling module build TINY_SIZES; returns that module."""
    modeling = importlib.import_module(f"lerobot.policies.{kind}.modeling_{kind}")
    heads = {"num_heads": TINY_SIZES["num_attention_heads"], "num_kv_heads": TINY_SIZES["num_key_value_heads"]}
    vlm = modeling.GemmaConfig(
        TINY_SIZES["vlm_width"],
        TINY_SIZES["vlm_depth"],
        TINY_SIZES["vlm_mlp_dim"],
        head_dim=TINY_SIZES["head_dim"],
        **heads,
    )
    expert = modeling.GemmaConfig(
        TINY_SIZES["expert_width"],
        TINY_SIZES["expert_depth"],
        TINY_SIZES["expert_mlp_dim"],
        head_dim=TINY_SIZES["head_dim"],
        **heads,
    )
    monkeypatch.setattr(modeling, "get_gemma_config", lambda variant: vlm if variant == "gemma_2b" else expert)

    build_paligemma = modeling.PaliGemmaForConditionalGenerationWithPiGemma

    def tiny_paligemma(config: Any) -> Any:
        vision = config.vision_config
        vision.hidden_size = TINY_SIZES["vision_width"]
        vision.num_hidden_layers = TINY_SIZES["vision_depth"]
        vision.num_attention_heads = TINY_SIZES["vision_num_heads"]
        vision.intermediate_size = TINY_SIZES["vision_mlp_dim"]
        vision.projection_dim = TINY_SIZES["vlm_width"]
        config.text_config.vocab_size = TINY_SIZES["vocab_size"]
        return build_paligemma(config)

    build_expert = modeling.PiGemmaForCausalLM

    def tiny_expert(config: Any) -> Any:
        config.vocab_size = TINY_SIZES["vocab_size"]
        return build_expert(config)

    monkeypatch.setattr(modeling, "PaliGemmaForConditionalGenerationWithPiGemma", tiny_paligemma)
    monkeypatch.setattr(modeling, "PiGemmaForCausalLM", tiny_expert)
    patch_tokenizer(monkeypatch, tokenizer_dir)
    return modeling


def patch_tokenizer(monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path) -> None:
    """LeRobot's pre-processors load the gated PaliGemma tokenizer by name; make every name load ``tokenizer_dir``."""

    class LocalTokenizer:
        """Stands in for transformers.AutoTokenizer: every name resolves to the local Gemma-like tokenizer."""

        @staticmethod
        def from_pretrained(name: str, **kwargs: Any) -> Any:
            return AutoTokenizer.from_pretrained(tokenizer_dir)

    monkeypatch.setattr(tokenizer_processor, "AutoTokenizer", LocalTokenizer)


def redraw_weights(policy: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter from a fixed seed (matrices N(0, 1/fan_in), vectors N(0, 0.1)); lm_head := embed_tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            std = param[0].numel() ** -0.5 if param.ndim >= 2 else 0.1
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        paligemma = policy.model.paligemma_with_expert.paligemma
        paligemma.lm_head.weight.copy_(paligemma.model.language_model.embed_tokens.weight)


def build_reference(
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    tokenizer_dir: Path,
    stats: dict[str, dict[str, torch.Tensor]],
    config: dict[str, Any],
) -> Reference:
    """LeRobot's tiny ``kind`` policy for our ``config`` dict (cameras, dims, horizon), saved to ``folder``."""
    modeling = patch_lerobot_tiny(monkeypatch, kind, tokenizer_dir)
    processors = importlib.import_module(f"lerobot.policies.{kind}.processor_{kind}")
    config_class = modeling.PI05Config if kind == "pi05" else modeling.PI0Config
    policy_class = modeling.PI05Policy if kind == "pi05" else modeling.PI0Policy
    size = config["image_size"]
    inputs = {key: PolicyFeature(FeatureType.VISUAL, (3, size, size)) for key in config["camera_keys"]}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (config["state_dim"],))
    lerobot_config = config_class(
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (config["action_dim"],))},
        chunk_size=config["action_horizon"],
        n_action_steps=config["action_horizon"],
        image_resolution=(size, size),
        device="cpu",
    )
    policy = policy_class(lerobot_config)
    redraw_weights(policy)
    policy.eval()
    make_processors = getattr(processors, f"make_{kind}_pre_post_processors")
    preprocessor, postprocessor = make_processors(lerobot_config, stats)
    for artefact in (policy, preprocessor, postprocessor):
        artefact.save_pretrained(folder)
    return Reference(policy, preprocessor, postprocessor, folder)
