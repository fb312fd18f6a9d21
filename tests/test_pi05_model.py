"""Behaviour of the pi0.5 / pi0 model and processor beyond LeRobot parity (tests/test_pi05_parity.py).

Loss masking, save/reload through the Auto classes, batching, fine-tuning modes (expert_only, LoRA, 4-bit),
gradient checkpointing, bfloat16 loading, image and prompt preprocessing, and the fail-fast errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
from vla_recipes.models.pi05 import (
    TINY_PI0_CONFIG,
    TINY_PI05_CONFIG,
    Pi05Config,
    Pi05ForActionPrediction,
    Pi05ImageProcessor,
    Pi05Processor,
)

CAMERAS = TINY_PI05_CONFIG["camera_keys"]
HORIZON, ACTION_DIM, STATE_DIM = (TINY_PI05_CONFIG[k] for k in ("action_horizon", "action_dim", "state_dim"))
TINY = {"pi05": TINY_PI05_CONFIG, "pi0": TINY_PI0_CONFIG}


def stats(dim: int, seed: int) -> dict[str, list[float]]:
    generator = np.random.default_rng(seed)
    q01, q99 = -1 - generator.random(dim), 1 + generator.random(dim)
    return {
        "mean": generator.normal(size=dim).tolist(),
        "std": (0.5 + generator.random(dim)).tolist(),
        "min": (q01 - 1).tolist(),
        "max": (q99 + 1).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
    }


NORM_STATS = {"reach": {"action": stats(ACTION_DIM, 0), "proprio": stats(STATE_DIM, 1)}}


def build(kind: str = "pi05", seed: int = 0) -> tuple[Pi05ForActionPrediction, Pi05Processor]:
    torch.manual_seed(seed)
    model = Pi05ForActionPrediction(Pi05Config(**TINY[kind], norm_stats=NORM_STATS))
    with torch.no_grad():  # open the adaRMS gates (zero at init) so every expert branch matters
        for name, param in model.named_parameters():
            if "dense" in name:
                param.normal_(0.0, 0.1)
    return model.eval(), Pi05Processor.from_model_config(model.config, build_gemma_like_tokenizer())


def raw_batch(size: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tasks = ["pick up the bowl", "open the top drawer of the cabinet", "push the block"]
    images = {
        CAMERAS[0]: torch.rand(size, 3, 96, 128, generator=generator),
        CAMERAS[1]: torch.rand(size, 3, 224, 224, generator=generator),
    }
    return {"images": images, "text": tasks[:size], "state": torch.randn(size, STATE_DIM, generator=generator)}


def noise_like(size: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(size, HORIZON, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["pi05", "pi0"])
def test_padded_dims_and_steps_carry_no_loss(kind: str) -> None:
    model, processor = build(kind)
    inputs = processor(**raw_batch())
    generator = torch.Generator().manual_seed(4)
    actions = torch.randn(2, HORIZON, ACTION_DIM + 2, generator=generator)  # two extra (padded) dims
    is_pad = torch.zeros(2, HORIZON, dtype=torch.bool)
    is_pad[0, -3:] = True
    fixed = {"noise": noise_like(2), "time": torch.tensor([0.3, 0.8]), "action_is_pad": is_pad}
    out = model(**inputs, actions=actions, **fixed)

    perturbed = actions.clone()
    perturbed[..., ACTION_DIM:] += 5.0
    perturbed[0, -3:] += 5.0
    assert torch.equal(model(**inputs, actions=perturbed, **fixed).loss, out.loss)
    assert torch.all(out.losses[0, -3:] == 0)
    assert out.loss.item() == pytest.approx(out.losses.sum().item() / ((2 * HORIZON - 3) * ACTION_DIM), rel=1e-6)
    real_step_changed = actions.clone()
    real_step_changed[0, 0, 0] += 5.0
    assert model(**inputs, actions=real_step_changed, **fixed).loss != out.loss
    halves = [model(**inputs, actions=actions, **fixed, num_items_in_batch=n).loss for n in (10, 20)]
    assert halves[0].item() == pytest.approx(2 * halves[1].item())


@pytest.mark.parametrize("kind", ["pi0"])  # pi0.5: the family contract (tests/test_family_contract.py)
def test_save_and_auto_reload_predict_identically(kind: str, tmp_path: Path) -> None:
    """The pi0 variant (no registry entry of its own) through the Auto classes; its dead parameters stay frozen."""
    model, processor = build(kind)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), Pi05Config)
    reloaded, reprocessor = AutoModel.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, Pi05ForActionPrediction) and isinstance(reprocessor, Pi05Processor)
    assert reloaded.config.norm_stats == NORM_STATS
    raw = raw_batch()
    inputs, reinputs = processor(**raw), reprocessor(**raw)
    assert all(torch.equal(inputs[key], reinputs[key]) for key in inputs)
    expected = model.predict_action(**inputs, noise=noise_like(2))
    assert torch.equal(reloaded.predict_action(**reinputs, noise=noise_like(2)), expected)
    assert sorted(name for name, p in reloaded.named_parameters() if not p.requires_grad) == sorted(
        model.dead_parameter_names()
    )


def test_checkpoint_with_only_the_lm_head_fills_the_embeddings(tmp_path: Path) -> None:
    """openpi-converted checkpoints tie the embeddings to PaliGemma's lm_head and may store only the latter."""
    from safetensors.torch import load_file, save_file

    model, _ = build()
    paligemma = model.model.paligemma_with_expert.paligemma
    with torch.no_grad():
        paligemma.lm_head.weight.copy_(paligemma.model.language_model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    reloaded, info = Pi05ForActionPrediction.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_a_camera_missing_in_one_sample_batches_as_alone() -> None:
    """Batched equals one by one when one sample lacks a camera (the general case: the family contract)."""
    model, processor = build()
    raw = raw_batch(3)
    raw["images"][CAMERAS[1]] = list(raw["images"][CAMERAS[1]])
    raw["images"][CAMERAS[1]][1] = None  # a missing camera in one sample
    inputs, noise = processor(**raw), noise_like(3)
    batched = model.predict_action(**inputs, noise=noise)
    assert batched.shape == (3, HORIZON, ACTION_DIM) and batched.dtype == torch.float32
    for i in range(3):
        single = {key: value[i : i + 1] for key, value in inputs.items()}
        torch.testing.assert_close(
            model.predict_action(**single, noise=noise[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=0
        )


def test_predict_action_returns_dataset_units() -> None:
    model, processor = build()
    inputs = processor(**raw_batch())
    normalised = model.sample_actions(**inputs, noise=noise_like(2))
    q01, q99 = (torch.tensor(NORM_STATS["reach"]["action"][k]) for k in ("q01", "q99"))
    expected = (normalised + 1) / 2 * (q99 - q01) + q01
    torch.testing.assert_close(model.predict_action(**inputs, noise=noise_like(2)), expected)


def test_expert_only_leaves_vlm_unchanged_after_a_step() -> None:
    model, processor = build()
    model.train()
    model.freeze_vlm()
    vlm = model.model.paligemma_with_expert.paligemma
    before = {name: p.detach().clone() for name, p in vlm.named_parameters()}
    head = model.model.action_out_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**processor(**raw_batch()), actions=torch.randn(2, HORIZON, ACTION_DIM)).loss.backward()
    optimizer.step()

    assert all(torch.equal(p, before[name]) for name, p in vlm.named_parameters())
    assert not torch.equal(model.model.action_out_proj.weight, head)
    expert = model.model.paligemma_with_expert.gemma_expert.model
    assert all(p.requires_grad and p.grad is not None for p in expert.parameters())


@pytest.mark.parametrize("include_expert", [False, True])
def test_lora_targets_give_expected_trainable_count(include_expert: bool) -> None:
    peft = pytest.importorskip("peft")
    model, processor = build()
    targets = model.lora_target_modules(include_expert=include_expert)
    assert len(targets) == 7 * 2 - 5 + (7 * 2 if include_expert else 0)  # the last VLM layer's dead q/o/MLP skipped
    rank = 4
    modules = dict(model.named_modules())
    expected = sum(rank * (modules[t].in_features + modules[t].out_features) for t in targets)
    expected += sum(p.numel() for name in model.action_head_modules() for p in getattr(model.model, name).parameters())
    config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, modules_to_save=model.action_head_modules())
    wrapped = peft.get_peft_model(model, config)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert trainable == expected
    wrapped.train()
    wrapped(**processor(**raw_batch()), actions=torch.randn(2, HORIZON, ACTION_DIM)).loss.backward()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)


def test_4bit_nf4_load_runs_a_forward_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model, processor = build()
    model.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    quantized = Pi05ForActionPrediction.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    q_proj = quantized.model.paligemma_with_expert.paligemma.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert type(quantized.model.action_in_proj) is torch.nn.Linear  # float32 modules stay unquantised
    inputs = processor(**raw_batch())
    # A training forward: bitsandbytes' CPU inference kernel needs out_features % 32 == 0, which the tiny k_proj is not.
    loss = quantized(**inputs, actions=torch.randn(2, HORIZON, ACTION_DIM), noise=noise_like(2)).loss
    assert torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    model, processor = build()
    model.train()
    batch = {
        **processor(**raw_batch()),
        "actions": torch.randn(2, HORIZON, ACTION_DIM),
        "noise": noise_like(2),
        "time": torch.tensor([0.2, 0.9]),
    }
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert model.model.paligemma_with_expert.gradient_checkpointing
    torch.testing.assert_close(results[1][0], results[0][0])
    for with_checkpointing, without in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(with_checkpointing, without)


def test_bfloat16_load_keeps_lerobots_float32_modules(tmp_path: Path) -> None:
    model, processor = build()
    model.save_pretrained(tmp_path)
    half = Pi05ForActionPrediction.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    dtypes = {name: p.dtype for name, p in half.named_parameters()}
    backbone = "model.paligemma_with_expert.paligemma.model."
    assert dtypes[backbone + "language_model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes[backbone + "language_model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes[backbone + "vision_tower.vision_model.embeddings.patch_embedding.weight"] == torch.float32
    assert dtypes["model.action_in_proj.weight"] == dtypes["model.time_mlp_in.weight"] == torch.float32
    batch = {
        **processor(**raw_batch()),
        "actions": torch.randn(2, HORIZON, ACTION_DIM),
        "noise": noise_like(2),
        "time": torch.tensor([0.4, 0.6]),
    }
    assert half(**batch).loss.item() == pytest.approx(model(**batch).loss.item(), rel=0.1)


def test_image_processor_formats_missing_cameras_and_padding() -> None:
    processor = Pi05ImageProcessor(image_size=224, camera_keys=CAMERAS)
    generator = torch.Generator().manual_seed(0)
    uint8_hwc = torch.randint(0, 256, (2, 96, 128, 3), dtype=torch.uint8, generator=generator)
    as_float_chw = uint8_hwc.permute(0, 3, 1, 2).float() / 255
    from_dict = processor({CAMERAS[0]: uint8_hwc.numpy()})
    from_list = processor([[image] for image in as_float_chw])
    torch.testing.assert_close(from_dict["pixel_values"], from_list["pixel_values"])
    assert torch.all(from_dict["pixel_values"][:, 1] == -1)
    assert from_dict["image_masks"].tolist() == [[True, False], [True, False]]

    wide = processor([torch.ones(3, 112, 224)])["pixel_values"][0, 0]  # fits at 112 x 224: 56 black rows each side
    assert torch.all(wide[:, :56] == -1) and torch.all(wide[:, 56:168] == 1) and torch.all(wide[:, 168:] == -1)
    with pytest.raises(ValueError, match="unknown camera"):
        processor({"observation.images.other": as_float_chw})


def test_pi05_prompt_discretises_the_normalised_state() -> None:
    _, processor = build()
    proprio = NORM_STATS["reach"]["proprio"]
    q01, q99 = np.array(proprio["q01"]), np.array(proprio["q99"])
    state = q01.copy()  # normalised to -1: bin 0
    state[1] = q99[1]  # +1: bin 255
    state[2] = q01[2] + (1 + 0.004) / 2 * (q99[2] - q01[2])  # 0.004, inside bin 128 = [0, 1/128)
    state[3] = q01[3] - (q99[3] - q01[3])  # -3: below every bin, -1
    inputs = processor(images=[torch.rand(3, 224, 224)], text=["  Pick_up the\nbowl "], state=state[None])
    prompt = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert prompt == "Task: Pick up the bowl, State: 0 255 128 -1 0 0 0 0;\nAction: "
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert inputs["input_ids"].shape == (1, 200) and inputs["attention_mask"].sum() == len(prompt) + 1
    assert "state" not in inputs


def test_pi0_prompt_and_state() -> None:
    _, processor = build("pi0")
    raw = raw_batch(1)
    inputs = processor(**raw)
    assert processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True) == "pick up the bowl\n"
    assert inputs["input_ids"].shape == (1, 48)
    proprio = NORM_STATS["reach"]["proprio"]
    expected = (raw["state"] - torch.tensor(proprio["mean"])) / (torch.tensor(proprio["std"]) + 1e-8)
    torch.testing.assert_close(inputs["state"], expected)


def test_lerobot_config_mapping() -> None:
    pi0 = Pi05Config.from_lerobot_config({"type": "pi0"})
    assert (pi0.pi05, pi0.tokenizer_max_length, pi0.norm_mode) == (False, 48, "mean_std")
    assert (pi0.vlm_width, pi0.expert_width, pi0.head_dim, pi0.action_horizon) == (2048, 1024, 256, 50)
    features = {
        "observation.images.top": {"type": "VISUAL", "shape": [3, 224, 224]},
        "observation.state": {"type": "STATE", "shape": [6]},
    }
    pi05 = Pi05Config.from_lerobot_config(
        {
            "type": "pi05",
            "dtype": "bfloat16",
            "chunk_size": 10,
            "input_features": features,
            "output_features": {"action": {"type": "ACTION", "shape": [6]}},
            "empty_cameras": 1,
        }
    )
    assert pi05.camera_keys == ["observation.images.top", "observation.images.empty_camera_0"]
    assert (pi05.action_dim, pi05.state_dim, pi05.action_horizon, pi05.norm_mode) == (6, 6, 10, "quantiles")
    assert pi05.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="smolvla"):
        Pi05Config.from_lerobot_config({"type": "smolvla"})


def test_bad_inputs_fail_fast_with_the_fix() -> None:
    with pytest.raises(ValueError, match="vlm_depth and expert_depth"):
        Pi05Config(**{**TINY_PI05_CONFIG, "expert_depth": 3})
    model, processor = build()
    inputs = processor(**raw_batch())
    model.config.norm_stats = None
    with pytest.raises(ValueError, match="norm_stats is empty"):
        model.predict_action(**inputs)
    with pytest.raises(ValueError, match="pixel_values have shape"):
        model.sample_actions(**{**inputs, "pixel_values": inputs["pixel_values"][:, :1]})
    with pytest.raises(ValueError, match="actions have shape"):
        model(**inputs, actions=torch.zeros(2, HORIZON + 1, ACTION_DIM))
    with pytest.raises(ValueError, match="state has 3 dims"):
        processor(images=raw_batch()["images"], text=["a", "b"], state=torch.zeros(2, 3))
