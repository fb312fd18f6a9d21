"""Fine-tuning modes on the tiny OpenVLA: full, LoRA and QLoRA each take a real optimizer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vla_recipes.configs import DataArguments, ModelArguments
from vla_recipes.data.lerobot import VLADataset, dataset_norm_stats, load_metadata
from vla_recipes.families import get_family
from vla_recipes.finetuning import apply_finetune_mode, load_config, load_model

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/demo/openvla.yaml").read_text())
CAMERA = "observation.images.image"


@pytest.fixture(scope="module")
def batch_and_stats(dataset_root):
    data_args = DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root)
    meta = load_metadata(data_args)
    stats = dataset_norm_stats(meta, data_args, "bounds_q99", [True] * 6 + [False])
    dataset = VLADataset(meta, data_args, [CAMERA], episodes=[0])
    return [dataset[i] for i in range(4)], stats


def make(mode: str, tmp_path: Path, batch_and_stats):
    samples, stats = batch_and_stats
    model_args = ModelArguments(model_config=DEMO["model_config"], finetune_mode=mode, lora_r=4, lora_alpha=8)
    family = get_family("openvla")
    config = load_config(model_args)
    data_args = DataArguments(dataset_repo_id="local/synthetic_reach")
    family.configure(config, data_args, [CAMERA], action_dim=7, state_dim=8, norm_mode="bounds_q99", norm_stats=stats)
    model = load_model(model_args, config, family.model_class, str(tmp_path))
    processor = family.build_processor(model.config, model_args)
    targets = model.lora_target_modules()
    model = apply_finetune_mode(model, model_args)
    trainer = family.make_trainer(model=model, args=None, processor=processor, train_dataset=None, eval_dataset=None)
    return model, trainer.data_collator(samples), targets


def step(model, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One AdamW step; returns the trainable and frozen parameters before it."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    return trainable, frozen


def changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    params = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(params[n].detach(), p)}


def test_full_trains_every_used_parameter(tmp_path, batch_and_stats):
    model, batch, _ = make("full", tmp_path, batch_and_stats)
    trainable, frozen = step(model, batch)
    assert changed(model, trainable) == set(trainable)
    # only the modules OpenVLA never runs (last ViT blocks, final norms, SigLIP's pool) stay frozen
    assert frozen and all(".blocks.1." in n or ".norm." in n or "attn_pool" in n for n in frozen)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapters_train_only_lora_weights(tmp_path, batch_and_stats, mode):
    from peft.tuners.lora import LoraLayer

    model, batch, targets = make(mode, tmp_path, batch_and_stats)
    base = model.get_base_model()
    wrapped = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(targets)  # exactly the model's choice: every used linear but lm_head
    expected = sum(4 * (base.get_submodule(t).in_features + base.get_submodule(t).out_features) for t in targets)
    trainable, frozen = step(model, batch)
    assert set(trainable) and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected  # r * (in + out) per targeted linear
    assert "language_model.lm_head" not in targets and any("vision_backbone" in t for t in targets)
    assert changed(model, trainable) == {n for n in trainable if "lora_A" in n} | {
        n for n in trainable if "lora_B" in n
    }
    assert not changed(model, frozen)
    if mode == "qlora":
        import bitsandbytes as bnb

        assert isinstance(base.language_model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
