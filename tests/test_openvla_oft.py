"""OpenVLA-OFT: the attention mask, parallel decoding, the L1 head, proprio and cameras, checkpoints (ours and the
layout openvla-oft publishes), facts of the reference (moojink/openvla-oft) on the meta device."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from vla_recipes.families import get_family
from vla_recipes.models.openvla import OpenVLAConfig, OpenVLAForActionPrediction
from vla_recipes.models.openvla_oft import (
    TINY_OPENVLA_OFT_CONFIG,
    OpenVLAOFTConfig,
    OpenVLAOFTForActionPrediction,
    parallel_decoding_mask,
)

TASKS = ["pick up the black bowl", "open the top drawer of the cabinet and put the bowl inside", "stack"]


def norm_stats(action_dim: int = 7, state_dim: int = 8) -> dict:
    rng = np.random.default_rng(0)

    def bounds(dim: int) -> dict[str, list]:
        q01, q99 = -1 - rng.random(dim), 1 + rng.random(dim)
        return {"q01": q01.tolist(), "q99": q99.tolist(), "min": (q01 - 1).tolist(), "max": (q99 + 1).tolist()}

    return {"libero": {"action": bounds(action_dim) | {"mask": [True] * 6 + [False]}, "proprio": bounds(state_dim)}}


def tiny_model(**changes) -> OpenVLAOFTForActionPrediction:
    torch.manual_seed(0)
    config = OpenVLAOFTConfig(**{**copy.deepcopy(TINY_OPENVLA_OFT_CONFIG), "norm_stats": norm_stats(), **changes})
    config.norm_mode = "bounds_q99"
    return OpenVLAOFTForActionPrediction(config).eval()


@pytest.fixture(scope="module")
def model() -> OpenVLAOFTForActionPrediction:
    return tiny_model()


@pytest.fixture(scope="module")
def processor(model):
    return get_family("openvla_oft").new_processor(model.config, None)


def robot_inputs(n: int = 3, cameras: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": [
            [torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()] * cameras for _ in range(n)
        ],  # fmt: skip
        "text": (TASKS * n)[:n],
        "state": torch.randn(n, 8, generator=g),
    }


def test_mask_is_bidirectional_over_action_placeholders_and_causal_elsewhere() -> None:
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    is_action = torch.tensor([[0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = parallel_decoding_mask(valid, is_action, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],  # the first placeholder sees the later ones
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 0],  # padding: never a key
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_the_model_decodes_with_that_mask(model, processor, monkeypatch) -> None:
    """The first chunk step changes when the placeholders may only look back: the block is in use."""
    from vla_recipes.models.openvla_oft import modeling_openvla_oft

    case = robot_inputs(n=1)
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    bidirectional = model(**inputs).actions
    causal = parallel_decoding_mask
    monkeypatch.setattr(modeling_openvla_oft, "parallel_decoding_mask", lambda v, a, d: causal(v, a & False, d))
    causal_only = model(**inputs).actions
    assert not torch.allclose(bidirectional[:, 0], causal_only[:, 0])


def test_one_forward_pass_gives_the_chunk_whatever_the_batch(model, processor) -> None:
    case = robot_inputs()
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    assert inputs["pixel_values"].shape == (3, 12, 112, 112)  # 2 cameras x (DINOv2 + SigLIP) channels
    calls = []
    hook = model.language_model.model.register_forward_hook(lambda *_: calls.append(1))
    batched = model.predict_action(**inputs)
    hook.remove()
    assert len(calls) == 1 and batched.shape == (3, 8, 7) and batched.dtype == torch.float32
    for i in (1, 2):  # the longest and the shortest prompt alone: the same chunk as next to the others
        one = model.predict_action(**processor(images=case["images"][i : i + 1], text=case["text"][i : i + 1],
                                               state=case["state"][i : i + 1]))  # fmt: skip
        torch.testing.assert_close(one[0], batched[i], atol=1e-5, rtol=1e-5)
    # dataset units: the head's normalised output mapped through q01/q99 (the gripper dim is not normalised)
    normalized = model(**inputs).actions
    stats = model.config.norm_stats["libero"]["action"]
    q01, q99 = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    expected = (normalized + 1) / 2 * (q99 - q01 + 1e-8) + q01
    torch.testing.assert_close(batched[..., :6], expected[..., :6].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[..., 6], normalized[..., 6])


def test_every_input_reaches_the_actions(model, processor) -> None:
    """The placeholders see the prompt, every camera and the proprio token (and the L1 loss reaches the heads)."""
    case = robot_inputs(n=1)
    base = processor(images=case["images"], text=case["text"], state=case["state"])
    changed = {
        "wrist camera": {
            **base,
            "pixel_values": torch.cat([base["pixel_values"][:, :6], base["pixel_values"][:, 6:] + 1], 1),
        },  # fmt: skip
        "state": {**base, "state": base["state"] + 1},
        "prompt": processor(images=case["images"], text=["close the drawer"], state=case["state"]),
    }
    reference = model(**base).actions
    for name, inputs in changed.items():
        assert not torch.allclose(model(**inputs).actions, reference), name
    model.zero_grad()
    out = model(**base, actions=torch.zeros(1, 8, 7))
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.abs().mean())  # L1 on normalised actions
    for name in ("action_head.model.fc1.weight", "proprio_projector.fc1.weight", "projector.fc1.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.get_parameter("language_model.lm_head.weight").grad is None  # never run, frozen
    model.zero_grad()


def test_padded_chunk_steps_leave_the_loss(model, processor) -> None:
    case = robot_inputs(n=2)
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    targets = torch.zeros(2, 8, 7)
    is_pad = torch.zeros(2, 8, dtype=torch.bool)
    is_pad[0, 5:] = True
    out = model(**inputs, actions=targets, action_is_pad=is_pad)
    expected = out.actions.abs()[~is_pad].mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.losses[0, 5:].abs().sum() == 0


def test_loss_falls_on_synthetic_data(two_camera_root) -> None:
    """The collator and the model of `make demo-oft`, a few Adam steps on one batch of the dataset."""
    from vla_recipes.configs import DataArguments
    from vla_recipes.data.collators import VLADataCollator
    from vla_recipes.data.lerobot import VLADataset, dataset_norm_stats, load_metadata

    data_args = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=two_camera_root, state_key="observation.state",
        camera_keys=["observation.images.image", "observation.images.wrist_image"], action_horizon=2,
    )  # fmt: skip
    meta = load_metadata(data_args)
    stats = dataset_norm_stats(meta, data_args, "bounds_q99", [True] * 6 + [False])
    model = tiny_model(action_horizon=2, norm_stats=stats).train()
    dataset = VLADataset(meta, data_args, data_args.camera_keys, [0, 1])
    processor = get_family("openvla_oft").new_processor(model.config, None)
    collator = VLADataCollator(processor)
    batch = collator([dataset[i] for i in range(0, 24, 6)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_lora_targets_the_vla_and_trains_the_heads_in_full(model) -> None:
    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode

    targets = model.lora_target_modules()
    assert "language_model.model.layers.0.self_attn.q_proj" in targets and "projector.fc1" in targets
    assert not [t for t in targets if t.startswith(("action_head", "proprio_projector", "language_model.lm_head"))]
    args = ModelArguments(model_config={"model_type": "openvla_oft"}, finetune_mode="lora", lora_r=4)
    peft = apply_finetune_mode(tiny_model(), args, modules_to_save=get_family("openvla_oft").modules_to_save(model))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any("action_head" in n for n in trainable) and any("proprio_projector" in n for n in trainable)
    assert not any("embed_tokens" in n or "q_proj.base_layer" in n for n in trainable)


def write_published_layout(model: OpenVLAOFTForActionPrediction, folder: Path, step: int = 150000) -> None:
    """What openvla-oft's finetune.py writes: the merged VLA (config model_type openvla), DDP-prefixed head files."""
    fields = {k: v for k, v in model.config.to_dict().items() if k in OpenVLAConfig().to_dict()}
    openvla_config = OpenVLAConfig(**{**fields, "norm_stats": {"bridge_orig": norm_stats()["libero"]}})
    vla = OpenVLAForActionPrediction(openvla_config)
    vla.load_state_dict(model.state_dict(), strict=False)
    vla.save_pretrained(folder)
    for name in ("action_head", "proprio_projector"):
        state = {f"module.{k}": v for k, v in getattr(model, name).state_dict().items()}
        torch.save(state, folder / f"{name}--{step}_checkpoint.pt")
    (folder / "dataset_statistics.json").write_text(json.dumps(model.config.norm_stats))


def test_loads_a_checkpoint_in_the_published_layout(model, processor, tmp_path: Path) -> None:
    write_published_layout(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "openvla"
    loaded = OpenVLAOFTForActionPrediction.from_pretrained(tmp_path, action_horizon=8, num_images=2).eval()
    assert (loaded.config.action_dim, loaded.config.state_dim, loaded.config.num_images) == (7, 8, 2)
    assert "libero" in loaded.config.norm_stats  # dataset_statistics.json
    case = robot_inputs()
    inputs = processor(images=case["images"], text=case["text"], state=case["state"])
    expected = model.predict_action(**inputs, unnorm_key="libero")
    got = loaded.predict_action(**inputs, unnorm_key="libero")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(loaded.predict_action(**inputs, unnorm_key="libero"), got)  # deterministic


def test_real_size_layout_matches_the_reference_on_meta() -> None:
    """openvla-7b + OFT on LIBERO (constants.py: chunk 8, ACTION_DIM 7, PROPRIO_DIM 8): L1RegressionActionHead(
    input_dim=4096, hidden_dim=4096, action_dim=7) with MLPResNet(num_blocks=2, input_dim=4096 * 7), and
    ProprioProjector(llm_dim=4096, proprio_dim=8); the VLA keeps openvla-7b's keys."""
    config = OpenVLAOFTConfig.from_openvla(OpenVLAConfig(), action_horizon=8, num_images=2, state_dim=8)
    with torch.device("meta"):
        model = OpenVLAOFTForActionPrediction(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {k.removeprefix("action_head."): v for k, v in shapes.items() if k.startswith("action_head.")}
    assert head == {
        "model.layer_norm1.weight": (28672,), "model.layer_norm1.bias": (28672,),
        "model.fc1.weight": (4096, 28672), "model.fc1.bias": (4096,),
        **{f"model.mlp_resnet_blocks.{i}.ffn.{j}.{p}": (4096, 4096) if j == 1 and p == "weight" else (4096,)
           for i in range(2) for j in (0, 1) for p in ("weight", "bias")},
        "model.layer_norm2.weight": (4096,), "model.layer_norm2.bias": (4096,),
        "model.fc2.weight": (7, 4096), "model.fc2.bias": (7,),
    }  # fmt: skip
    proprio = {k.removeprefix("proprio_projector."): v for k, v in shapes.items() if k.startswith("proprio_")}
    assert proprio == {"fc1.weight": (4096, 8), "fc1.bias": (4096,), "fc2.weight": (4096, 4096), "fc2.bias": (4096,)}
    with torch.device("meta"):
        openvla = OpenVLAForActionPrediction(OpenVLAConfig())
    assert {k: v for k, v in shapes.items() if not k.startswith(("action_head.", "proprio_"))} == {
        k: tuple(v.shape) for k, v in openvla.state_dict().items()
    }
    assert config.num_action_tokens == 56  # placeholders decoded in one pass
    sequence = 1 + 2 * 256 + 1 + config.num_action_tokens  # BOS, 2 cameras, proprio, actions (+ the prompt)
    assert sequence < config.text_config.max_position_embeddings


def test_sft_starts_oft_from_an_openvla_config() -> None:
    family = get_family("openvla_oft")
    adopted = family.adopt_config(OpenVLAConfig(norm_stats=norm_stats()))
    assert isinstance(adopted, OpenVLAOFTConfig) and adopted.text_config.hidden_size == 4096
    with pytest.raises(ValueError, match="fused"):
        OpenVLAOFTConfig(use_fused_vision_backbone=False, num_images=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora"])  # full: the family contract's sft run (tests/test_family_contract.py)
def test_sft_trains_oft_and_the_output_predicts_chunks(tmp_path: Path, two_camera_root, mode: str) -> None:
    """`make demo-oft` shrunk, with LoRA on the VLA and the heads in full: recipes/sft.py on the OFT demo recipe
    (two cameras + state), loss falls, the output folder reloads through the Auto classes and predicts (batch, 8, 7)
    chunks in the dataset's units."""
    import yaml
    from cli import DEMOS, accelerate_launch

    out = tmp_path / "out"
    recipe = {
        **DEMOS["openvla_oft"],
        "dataset_root": two_camera_root,
        "train_episodes": ["0:3"],
        "eval_episodes": ["3:4"],
        "output_dir": str(out),
        "finetune_mode": mode,
        "max_steps": 40,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "eval_steps": 40,
        "learning_rate": 2e-3 if mode == "lora" else 5e-4,
        "lr_scheduler_kwargs": {"num_stable_steps": 30, "num_decay_steps": 1, "min_lr_ratio": 0.1},
        "dataloader_num_workers": 0,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = accelerate_launch("recipes/sft.py", "--config", str(tmp_path / "recipe.yaml"))
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses
    assert "eval_curr_action_l1" in json.loads((out / "eval_results.json").read_text())

    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is OpenVLAOFTForActionPrediction and model.config.num_images == 2
    case = robot_inputs()
    actions = model.predict_action(**processor(images=case["images"], text=case["text"], state=case["state"]))
    assert actions.shape == (3, 8, 7) and torch.isfinite(actions).all()


def test_qlora_quantises_the_vla_and_trains_the_float_heads(tmp_path: Path) -> None:
    from vla_recipes.configs import ModelArguments
    from vla_recipes.finetuning import apply_finetune_mode, load_config, load_model

    pytest.importorskip("bitsandbytes")
    tiny = {"model_type": "openvla_oft", **copy.deepcopy(TINY_OPENVLA_OFT_CONFIG)}
    args = ModelArguments(model_config=tiny, finetune_mode="qlora", lora_r=4)
    family = get_family("openvla_oft")
    model = load_model(args, load_config(args), family.model_class, str(tmp_path))
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.action_head.model.fc1.weight.dtype == torch.float32  # never quantised
    peft = apply_finetune_mode(model, args, modules_to_save=family.modules_to_save(model))
    out = peft(
        input_ids=torch.randint(3, 300, (2, 10)),
        pixel_values=torch.randn(2, 12, 112, 112),
        state=torch.randn(2, 8),
        actions=torch.zeros(2, 8, 7),
    )
    out.loss.backward()
    grads = {n for n, p in peft.named_parameters() if p.grad is not None}
    assert any("action_head" in n for n in grads) and any("lora_A" in n for n in grads)


def test_a_mixture_trains_with_each_datasets_statistics(tmp_path) -> None:
    """`datasets:` with OpenVLA-OFT: make_trainer once took a single dataset's statistics and failed on a mixture;
    now each sample's actions are normalised with its own dataset's, and the loss is finite."""
    from vla_recipes.configs import VLATrainingArguments
    from vla_recipes.models.openvla_oft.processing_openvla_oft import OpenVLAOFTProcessor

    mixture = {"libero": norm_stats()["libero"], "other": norm_stats(7, 8)["libero"]}
    mixture["other"]["action"] = {
        k: [2 * x for x in v] if k != "mask" else v for k, v in mixture["other"]["action"].items()
    }
    model = tiny_model(action_horizon=2, norm_stats=mixture, default_unnorm_key="libero").train()
    family = get_family("openvla_oft")
    processor = family.new_processor(model.config, None)
    args = VLATrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False)
    trainer = family.make_trainer(model=model, args=args, processor=processor, train_dataset=[], eval_dataset=None)
    inputs = robot_inputs(n=2)
    samples = [
        {
            "images": images,
            "task": task,
            "state": state,
            "actions": torch.ones(2, 7),
            "action_is_pad": torch.zeros(2, dtype=torch.bool),
            "dataset": name,
        }
        for images, task, state, name in zip(inputs["images"], inputs["text"], inputs["state"], mixture, strict=True)
    ]
    batch = trainer.data_collator(samples)
    assert isinstance(trainer.processing_class, OpenVLAOFTProcessor)
    for row, name in enumerate(mixture):
        expected = processor(
            **{k: v[row : row + 1] for k, v in inputs.items()}, actions=torch.ones(1, 2, 7), unnorm_key=name
        )
        assert torch.equal(batch["actions"][row], expected["actions"][0])
    assert not torch.equal(batch["actions"][0], batch["actions"][1])
    assert torch.isfinite(model(**batch).loss)
