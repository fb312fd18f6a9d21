"""Converting an openvla/openvla-7b folder: layout check, config mapping, identical logits after loading."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
from vla_recipes.models.openvla import TINY_OPENVLA_CONFIG, OpenVLAConfig, OpenVLAForActionPrediction, OpenVLAProcessor
from vla_recipes.models.openvla.convert_openvla_checkpoint import convert_config, expected_shapes, main

STATS = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "min": [-1.0] * 6 + [0.0], "max": [1.0] * 7}
# openvla-7b's config.json, norm_stats cut down to one dataset.
OPENVLA_7B_CONFIG = {
    "arch_specifier": "no-align+fused-gelu-mlp",
    "architectures": ["OpenVLAForActionPrediction"],
    "auto_map": {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    },
    "hf_llm_id": "meta-llama/Llama-2-7b-hf",
    "image_resize_strategy": "resize-naive",
    "image_sizes": [224, 224],
    "llm_backbone_id": "llama2-7b-pure",
    "llm_max_length": 2048,
    "model_type": "openvla",
    "n_action_bins": 256,
    "norm_stats": {
        "bridge_orig": {
            "action": {**STATS, "mean": [0.0] * 7, "std": [1.0] * 7, "mask": [True] * 6 + [False]},
            "proprio": {**STATS, "mean": [0.0] * 7, "std": [1.0] * 7},
            "num_transitions": 10,
            "num_trajectories": 2,
        }
    },
    "output_projector_states": False,
    "pad_to_multiple_of": 64,
    "pad_token_id": 32000,
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px",
}


def test_openvla_7b_config_gives_its_exact_layout() -> None:
    config = convert_config(copy.deepcopy(OPENVLA_7B_CONFIG))
    assert config.image_size == 224 and config.num_patches == 256 and config.tokenizer_vocab_size == 32000
    assert config.action_dim == 7 and config.norm_stats == OPENVLA_7B_CONFIG["norm_stats"]
    assert config.vision_backbone_id == "dinosiglip-vit-so-224px" and not hasattr(config, "auto_map")
    shapes = expected_shapes(config)
    assert len(shapes) == 982 and sum(math.prod(s) for s in shapes.values()) == 7_541_237_184
    assert shapes["vision_backbone.featurizer.blocks.23.ls2.scale_factor"] == (1024,)
    assert shapes["vision_backbone.featurizer.reg_token"] == (1, 4, 1024)
    assert shapes["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["vision_backbone.fused_featurizer.attn_pool.kv.weight"] == (2304, 1152)
    assert shapes["projector.fc1.weight"] == (8704, 2176) and shapes["projector.fc3.weight"] == (4096, 4096)
    assert shapes["language_model.lm_head.weight"] == (32064, 4096)
    assert shapes["language_model.model.layers.31.mlp.down_proj.weight"] == (4096, 11008)


def tiny_7b_layout_state_dict(vision: int = 64, llm: int = 64, vocab: int = 419) -> dict[str, torch.Tensor]:
    """Keys written from openvla.md section 6 (not from our model), with the tiny config's shapes."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (out_dim, in_dim)
        if bias:
            shapes[f"{name}.bias"] = (out_dim,)

    def norm(name: str, dim: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (dim,), (dim,)

    for prefix, layer_scale in (("vision_backbone.featurizer", True), ("vision_backbone.fused_featurizer", False)):
        shapes[f"{prefix}.pos_embed"] = (1, 64, vision)
        shapes[f"{prefix}.patch_embed.proj.weight"] = (vision, 3, 14, 14)
        shapes[f"{prefix}.patch_embed.proj.bias"] = (vision,)
        norm(f"{prefix}.norm", vision)
        for i in range(2):
            block = f"{prefix}.blocks.{i}"
            norm(f"{block}.norm1", vision)
            norm(f"{block}.norm2", vision)
            linear(f"{block}.attn.qkv", 3 * vision, vision)
            linear(f"{block}.attn.proj", vision, vision)
            linear(f"{block}.mlp.fc1", 4 * vision, vision)
            linear(f"{block}.mlp.fc2", vision, 4 * vision)
            if layer_scale:
                shapes[f"{block}.ls1.scale_factor"] = shapes[f"{block}.ls2.scale_factor"] = (vision,)
    shapes["vision_backbone.featurizer.cls_token"] = (1, 1, vision)
    shapes["vision_backbone.featurizer.reg_token"] = (1, 4, vision)
    pool = "vision_backbone.fused_featurizer.attn_pool"
    shapes[f"{pool}.latent"] = (1, 1, vision)
    linear(f"{pool}.q", vision, vision)
    linear(f"{pool}.kv", 2 * vision, vision)
    linear(f"{pool}.proj", vision, vision)
    norm(f"{pool}.norm", vision)
    linear(f"{pool}.mlp.fc1", 4 * vision, vision)
    linear(f"{pool}.mlp.fc2", vision, 4 * vision)
    linear("projector.fc1", 8 * vision, 2 * vision)
    linear("projector.fc2", llm, 8 * vision)
    linear("projector.fc3", llm, llm)
    shapes["language_model.model.embed_tokens.weight"] = (vocab, llm)
    for i in range(2):
        layer = f"language_model.model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            linear(f"{layer}.self_attn.{proj}_proj", llm, llm, bias=False)
        linear(f"{layer}.mlp.gate_proj", 2 * llm, llm, bias=False)
        linear(f"{layer}.mlp.up_proj", 2 * llm, llm, bias=False)
        linear(f"{layer}.mlp.down_proj", llm, 2 * llm, bias=False)
        shapes[f"{layer}.input_layernorm.weight"] = shapes[f"{layer}.post_attention_layernorm.weight"] = (llm,)
    shapes["language_model.model.norm.weight"] = (llm,)
    linear("language_model.lm_head", vocab, llm, bias=False)
    generator = torch.Generator().manual_seed(0)
    return {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def write_openvla_folder(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A tiny stand-in for the downloaded openvla-7b folder (remote-code pointers included)."""
    folder.mkdir()
    tiny = copy.deepcopy(TINY_OPENVLA_CONFIG)
    config = {
        **OPENVLA_7B_CONFIG,
        # Shrunk sizes: a real checkpoint derives these from timm_model_ids.
        "featurizer_config": tiny["featurizer_config"],
        "fused_featurizer_config": tiny["fused_featurizer_config"],
        "text_config": tiny["text_config"],
        "pad_token_id": 355,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    build_llama_like_tokenizer().save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoProcessor": "processing_prismatic.PrismaticProcessor"}
    tokenizer_config["processor_class"] = "PrismaticProcessor"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    preprocessor = {
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor"},
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def test_convert_tiny_checkpoint_reproduces_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dict = tiny_7b_layout_state_dict()
    write_openvla_folder(tmp_path / "openvla", state_dict)
    argv = ["convert", "--input_dir", str(tmp_path / "openvla"), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    main()

    converted = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(converted, OpenVLAForActionPrediction)
    assert converted.config.norm_stats == OPENVLA_7B_CONFIG["norm_stats"]
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    direct = OpenVLAForActionPrediction(OpenVLAConfig(**copy.deepcopy(TINY_OPENVLA_CONFIG))).eval()
    direct.load_state_dict(state_dict, strict=True)

    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(processor, OpenVLAProcessor) and processor.image_processor.image_size == 112
    image = np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    inputs = processor(images=[image, image[::-1]], text=["pick up the cup", "open the drawer"])
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, direct(**inputs).logits)
    assert converted.predict_action(**inputs).shape == (2, 1, 7)


def test_mismatched_checkpoint_fails_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dict = tiny_7b_layout_state_dict()
    del state_dict["projector.fc3.bias"]
    state_dict["language_model.lm_head.weight"] = torch.zeros(420, 64)
    state_dict["vision_backbone.featurizer.blocks.0.ls1.gamma"] = state_dict.pop(
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor"
    )
    write_openvla_folder(tmp_path / "openvla", state_dict)
    argv = ["convert", "--input_dir", str(tmp_path / "openvla"), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError) as error:
        main()
    message = str(error.value)
    assert "missing projector.fc3.bias" in message
    assert "unexpected vision_backbone.featurizer.blocks.0.ls1.gamma" in message
    assert "language_model.lm_head.weight: checkpoint (420, 64) vs model (419, 64)" in message
    assert not (tmp_path / "out").exists()
