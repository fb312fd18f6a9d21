"""The tiny OpenVLA: layout, loss masking, gradients, save/load, batched predict_action, LoRA, 4-bit, processor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel

from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
from vla_recipes.models.openvla import (
    TINY_OPENVLA_CONFIG,
    ActionTokenizer,
    OpenVLAConfig,
    OpenVLAForActionPrediction,
    OpenVLAImageProcessor,
    OpenVLAProcessor,
    build_prompt,
)

NUM_PATCHES = 64
NORM_STATS = {
    "demo": {
        "action": {
            "q01": [-1.0, -2.0, -0.5, 0.0, -3.0, 1.0, 0.0],
            "q99": [1.0, 2.0, 0.5, 4.0, 3.0, 2.0, 1.0],
            "min": [-2.0, -3.0, -1.0, -1.0, -4.0, 0.0, 0.0],
            "max": [2.0, 3.0, 1.0, 5.0, 4.0, 3.0, 1.0],
            "mask": [True] * 6 + [False],
        }
    }
}
INSTRUCTIONS = ["pick up the red block", "Open the top drawer and put the bowl inside", "stack"]


def tiny_model(seed: int = 0, **overrides) -> OpenVLAForActionPrediction:
    torch.manual_seed(seed)
    config = OpenVLAConfig(**{**copy.deepcopy(TINY_OPENVLA_CONFIG), "norm_stats": NORM_STATS, **overrides})
    return OpenVLAForActionPrediction(config).eval()


@pytest.fixture(scope="module")
def model() -> OpenVLAForActionPrediction:
    return tiny_model()


@pytest.fixture(scope="module")
def processor() -> OpenVLAProcessor:
    return OpenVLAProcessor(OpenVLAImageProcessor(image_size=112), build_llama_like_tokenizer())


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def training_batch(processor: OpenVLAProcessor) -> dict[str, torch.Tensor]:
    """Prompt + 7 action tokens + EOS per row, right-padded; labels only on the actions and EOS (the collator's job)."""
    tokenizer = processor.tokenizer
    action_ids = ActionTokenizer(tokenizer).encode(np.random.default_rng(0).uniform(-1, 1, size=(2, 7)))
    rows = [
        tokenizer(build_prompt(text))["input_ids"] + ids.tolist() + [tokenizer.eos_token_id]
        for text, ids in zip(INSTRUCTIONS[:2], action_ids, strict=True)
    ]
    length = max(map(len, rows))
    input_ids = torch.full((2, length), tokenizer.pad_token_id)
    labels = torch.full((2, length), -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(row) - 8 : len(row)] = torch.tensor(row[-8:])
    pixel_values = processor.image_processor(images(2))["pixel_values"]
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
        "pixel_values": pixel_values,
        "labels": labels,
    }


def test_state_dict_has_openvla_7b_key_layout(model: OpenVLAForActionPrediction) -> None:
    keys = set(model.state_dict())
    assert model.num_patches == model.config.num_patches == NUM_PATCHES
    for key in [
        "vision_backbone.featurizer.reg_token",
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor",
        "vision_backbone.featurizer.blocks.1.ls2.scale_factor",
        "vision_backbone.fused_featurizer.attn_pool.latent",
        "vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight",
        "projector.fc3.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    ]:
        assert key in keys
    assert not any("gamma" in key for key in keys)
    assert model.projector.fc1.out_features == 4 * (64 + 64)


def test_loss_is_cross_entropy_on_labelled_tokens_only(
    model: OpenVLAForActionPrediction, processor: OpenVLAProcessor
) -> None:
    batch = training_batch(processor)
    out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1] + NUM_PATCHES, 419)
    labels = torch.cat([batch["labels"][:, :1], torch.full((2, NUM_PATCHES), -100), batch["labels"][:, 1:]], 1)
    shifted = labels[:, 1:]
    manual = F.cross_entropy(out.logits[:, :-1][shifted != -100], shifted[shifted != -100])
    torch.testing.assert_close(out.loss, manual)

    bool_mask = {**batch, "attention_mask": batch["attention_mask"].bool()}  # the collator's dtype
    torch.testing.assert_close(model(**bool_mask).loss, out.loss)

    # Logits where the next label is -100 (prompt, image, padding) can be anything: the loss does not move.
    ignored = torch.cat([shifted == -100, torch.ones(2, 1, dtype=torch.bool)], 1)
    hook = model.language_model.lm_head.register_forward_hook(
        lambda _m, _i, logits: logits + 100 * torch.randn_like(logits) * ignored[..., None]
    )
    try:
        torch.testing.assert_close(model(**batch).loss, out.loss)
    finally:
        hook.remove()


def test_num_items_in_batch_makes_accumulation_equal_the_full_batch(
    model: OpenVLAForActionPrediction, processor: OpenVLAProcessor
) -> None:
    batch = training_batch(processor)
    n_items = int((batch["labels"] != -100).sum())
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    accumulated = sum(model(**half, num_items_in_batch=n_items).loss for half in halves)
    torch.testing.assert_close(accumulated, model(**batch).loss)


def test_backward_reaches_used_parts_only(processor: OpenVLAProcessor) -> None:
    model = tiny_model().train()
    model(**training_batch(processor)).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in [
        "projector.fc1.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
        "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
        "vision_backbone.featurizer.cls_token",
        "vision_backbone.fused_featurizer.patch_embed.proj.weight",
    ]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    unused = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert unused and all(grads[name] is None for name in unused)
    assert all(any(part in name for part in ("blocks.1.", ".norm.", "attn_pool")) for name in unused), (
        "only the last block, final norm and attention pool are frozen"
    )
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_single_backbone_variant() -> None:
    model = tiny_model(use_fused_vision_backbone=False, fused_featurizer_config=None)
    assert model.vision_backbone.fused_featurizer is None and not hasattr(model.projector, "fc3")
    assert model.projector.fc1.in_features == 64 and model.projector.fc1.out_features == 64
    image_processor = OpenVLAImageProcessor.for_model(model.config)
    pixel_values = image_processor(images(2))["pixel_values"]
    assert pixel_values.shape == (2, 3, 112, 112)
    input_ids = torch.tensor([[1, 40, 41], [1, 42, 43]])
    assert model(input_ids=input_ids, pixel_values=pixel_values).logits.shape == (2, 3 + NUM_PATCHES, 419)
    with pytest.raises(ValueError, match="3 channels"):
        model(input_ids=input_ids, pixel_values=torch.zeros(2, 6, 112, 112))


def test_gradient_checkpointing_gives_the_same_loss(processor: OpenVLAProcessor) -> None:
    model = tiny_model().train()
    batch = training_batch(processor)
    reference = model(**batch).loss
    model.gradient_checkpointing_enable()
    assert all(vit.grad_checkpointing for vit in model.vision_backbone.vits())
    loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    assert model.projector.fc1.weight.grad is not None


@pytest.mark.parametrize("horizon", [1, 2])
def test_predict_action_batched_equals_one_by_one(processor: OpenVLAProcessor, horizon: int) -> None:
    model = tiny_model(seed=horizon, action_horizon=horizon)
    batch = processor(images=images(3), text=INSTRUCTIONS)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3, "prompts of different lengths"
    actions = model.predict_action(**batch)
    assert actions.shape == (3, horizon, 7) and actions.dtype == torch.float32
    one_by_one = torch.cat(
        [
            model.predict_action(**processor(images=[image], text=[text]))
            for image, text in zip(images(3), INSTRUCTIONS, strict=True)
        ]
    )
    torch.testing.assert_close(actions, one_by_one, atol=1e-5, rtol=0)

    # The actions are the bin centres of the generated ids, un-normalised with OpenVLA's formula.
    ids = model.generate_action_ids(**batch).numpy()
    assert ids.shape == (3, horizon * 7)
    normalized = ActionTokenizer(processor.tokenizer).decode_token_ids_to_actions(ids).reshape(3, horizon, 7)
    stats = {k: np.asarray(v) for k, v in NORM_STATS["demo"]["action"].items()}
    manual = np.where(stats["mask"], 0.5 * (normalized + 1) * (stats["q99"] - stats["q01"]) + stats["q01"], normalized)
    np.testing.assert_allclose(actions.numpy(), manual, atol=1e-5)


def test_predict_action_fails_fast_on_missing_stats(processor: OpenVLAProcessor) -> None:
    batch = processor(images=images(1), text=INSTRUCTIONS[:1])
    with pytest.raises(ValueError, match="unnorm_key"):
        tiny_model().predict_action(**batch, unnorm_key="other")
    with pytest.raises(ValueError, match="norm_stats"):
        tiny_model(norm_stats=None).predict_action(**batch)
    with pytest.raises(ValueError, match="action_dim=6"):
        tiny_model(action_dim=6).predict_action(**batch)


def test_lora_trains_adapters_only(processor: OpenVLAProcessor) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    targets = model.lora_target_modules()
    assert "language_model.lm_head" not in targets and "projector.fc1" in targets
    assert "vision_backbone.featurizer.blocks.0.attn.qkv" in targets
    assert not any(
        t.startswith(("vision_backbone.featurizer.blocks.1", "vision_backbone.fused_featurizer.attn")) for t in targets
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    peft_model.train()
    peft_model(**training_batch(processor)).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_4bit_load_runs_forward_and_lora(model: OpenVLAForActionPrediction, tmp_path: Path) -> None:
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    quantized = AutoModel.from_pretrained(tmp_path, quantization_config=quantization)
    assert isinstance(quantized.language_model.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(quantized.vision_backbone.featurizer.blocks[0].attn.qkv, Linear4bit)
    batch = {
        "input_ids": torch.tensor([[1, 40, 41, 42, 43]]),
        "pixel_values": torch.randn(1, 6, 112, 112),
        "labels": torch.tensor([[-100, -100, -100, 42, 43]]),
    }
    out = quantized(**batch)
    assert out.logits.shape == (1, 5 + NUM_PATCHES, 419) and torch.isfinite(out.logits).all()
    peft_model = get_peft_model(quantized, LoraConfig(r=4, target_modules=quantized.lora_target_modules()))
    peft_model(**batch).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_prompt_and_token_layout(processor: OpenVLAProcessor) -> None:
    tokenizer = processor.tokenizer
    assert build_prompt("Pick up the Bowl") == "In: What action should the robot take to pick up the bowl?\nOut: "
    batch = processor(images=images(2), text=["go", "pick up the bowl"])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert lengths[0] < lengths[1] and (ids[0, lengths[0] :] == tokenizer.pad_token_id).all(), "right padding"
    space = tokenizer.convert_tokens_to_ids("▁")
    assert ids[0, lengths[0] - 1] == space and ids[1, lengths[1] - 1] == space, "prompt ends in the lone space token"


def test_image_processor_matches_the_reference_pipeline() -> None:
    from torchvision.transforms import functional as TVF

    processor = OpenVLAImageProcessor(image_size=112)
    image = images(1)[0]
    pixel_values = processor(image)["pixel_values"]
    assert pixel_values.shape == (1, 6, 112, 112) and pixel_values.dtype == torch.float32

    # prismatic's processing: TVF.resize(PIL, bicubic, antialias) -> to_tensor -> normalize, per backbone.
    resized = TVF.resize(
        Image.fromarray(image), [112, 112], interpolation=TVF.InterpolationMode.BICUBIC, antialias=True
    )
    tensor = TVF.to_tensor(resized)
    expected = torch.cat(
        [
            TVF.normalize(tensor, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            TVF.normalize(tensor, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    assert torch.equal(pixel_values[0], expected)

    # LeRobot float CHW in [0, 1], torch uint8 CHW and PIL give the same pixels.
    chw = torch.from_numpy(image).permute(2, 0, 1)
    for same in (chw, chw.float() / 255, Image.fromarray(image)):
        assert torch.equal(processor(same)["pixel_values"], pixel_values)
    assert processor(torch.stack([chw, chw]).float() / 255)["pixel_values"].shape == (2, 6, 112, 112)
    with pytest.raises(ValueError, match="RGB"):
        processor(np.zeros((4, 4)))
