"""Parity with LeRobot itself: its tiny PI05Policy / PI0Policy, saved LeRobot-style, loaded by our model.

The same raw inputs (float images of odd sizes, state, task strings, actions) go through LeRobot's pre-processor and
policy and through our processor and model, with the same noise and time; windows have no padded steps (LeRobot
ignores ``action_is_pad``). Run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lerobot_pi05_reference import TINY_SIZES, build_reference

from vla_recipes.configs import ModelArguments
from vla_recipes.families import get_family, package_families
from vla_recipes.finetuning import load_config, load_model
from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
from vla_recipes.models.pi05 import (
    TINY_PI0_CONFIG,
    TINY_PI05_CONFIG,
    Pi05Config,
    Pi05ForActionPrediction,
    Pi05Processor,
)
from vla_recipes.models.pi05 import paligemma_with_expert as attention
from vla_recipes.models.pi05.lerobot_format import LEROBOT_STATS_KEY
from vla_recipes.models.pi05.paligemma_with_expert import sdpa_attention

BATCH = 2
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gemma_like_tokenizer")
    build_gemma_like_tokenizer().save_pretrained(folder)
    return folder


def make_stats(dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    q01 = -1.0 - torch.rand(dim, generator=generator)
    q99 = 1.0 + torch.rand(dim, generator=generator)
    return {
        "mean": 0.1 * torch.randn(dim, generator=generator),
        "std": 0.5 + torch.rand(dim, generator=generator),
        "min": q01 - 0.5,
        "max": q99 + 0.5,
        "q01": q01,
        "q99": q99,
    }


def make_raw(config: dict) -> dict:
    """LeRobot-style raw batch: float [0, 1] CHW images of non-224 sizes, state and actions in dataset units."""
    generator = torch.Generator().manual_seed(1)
    stats = {
        "observation.state": make_stats(config["state_dim"], generator),
        "action": make_stats(config["action_dim"], generator),
    }
    state = 3 * torch.rand(BATCH, config["state_dim"], generator=generator) - 1.5
    actions = 3 * torch.rand(BATCH, config["action_horizon"], config["action_dim"], generator=generator) - 1.5
    cameras = config["camera_keys"]
    images = {
        cameras[0]: torch.rand(BATCH, 3, 200, 260, generator=generator),
        cameras[1]: torch.rand(BATCH, 3, 240, 180, generator=generator),
    }
    tasks = ["pick_up the red bowl\n", "  open the top drawer "]
    return {"stats": stats, "images": images, "state": state, "actions": actions, "tasks": tasks}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@dataclass
class LeRobotRun:
    """LeRobot's tiny policy saved in ``folder``, the raw inputs it saw and what it computed from them."""

    config: dict
    raw: dict
    batch: dict
    images: torch.Tensor
    image_masks: torch.Tensor
    folder: Path
    noise: torch.Tensor
    time: torch.Tensor
    loss: float
    actions: torch.Tensor


@pytest.fixture(scope="module", params=[("pi05", TINY_PI05_CONFIG), ("pi0", TINY_PI0_CONFIG)], ids=["pi05", "pi0"])
def lerobot_run(request, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> LeRobotRun:
    """Run LeRobot once per kind; both attention implementations of ours are compared with it."""
    kind, config = request.param
    raw = make_raw(config)
    folder = tmp_path_factory.mktemp(f"lerobot_{kind}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = build_reference(kind, monkeypatch, folder, tokenizer_dir, raw["stats"], config)
        batch = reference.preprocessor(
            {**raw["images"], "observation.state": raw["state"], "action": raw["actions"], "task": raw["tasks"]}
        )
        images, masks = reference.policy._preprocess_images(batch)
        generator = torch.Generator().manual_seed(2)
        noise = torch.randn(BATCH, config["action_horizon"], 32, generator=generator)
        time = torch.rand(BATCH, generator=generator) * 0.999 + 0.001
        monkeypatch.setattr(reference.policy.model, "sample_noise", lambda shape, device: noise)
        monkeypatch.setattr(reference.policy.model, "sample_time", lambda size, device: time)
        with torch.no_grad():
            loss, _ = reference.policy.forward(batch)
            actions = reference.postprocessor(reference.policy.predict_action_chunk(batch, noise=noise))
    return LeRobotRun(
        config, raw, batch, torch.stack(images, 1), torch.stack(masks, 1), folder, noise, time, loss.item(), actions
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_lerobot(lerobot_run: LeRobotRun, attn: str, monkeypatch) -> None:
    """eager is LeRobot's attention op for op: loss and actions equal bit for bit. sdpa (the default) is PyTorch's
    fused kernel: the same to float32 rounding."""
    run, config, raw, batch = lerobot_run, lerobot_run.config, lerobot_run.raw, lerobot_run.batch
    # The LeRobot folder loads as is; only the sizes its config.json cannot name are given.
    model = Pi05ForActionPrediction.from_pretrained(run.folder, **TINY_SIZES, attn_implementation=attn).eval()
    assert model.config.pi05 == config["pi05"]
    assert model.config._attn_implementation == attn
    assert model.config.norm_stats[LEROBOT_STATS_KEY]["action"]["q01"] == raw["stats"]["action"]["q01"].tolist()
    processor = Pi05Processor.from_model_config(model.config, build_gemma_like_tokenizer())
    inputs = processor(images=raw["images"], text=raw["tasks"], state=raw["state"])
    actions = processor(images=raw["images"], text=raw["tasks"], state=raw["state"], actions=raw["actions"])["actions"]

    # Pre-processing: tokens exactly, images, state and actions to float rounding.
    assert torch.equal(inputs["input_ids"], batch["observation.language.tokens"])
    assert torch.equal(inputs["attention_mask"], batch["observation.language.attention_mask"])
    assert max_diff(inputs["pixel_values"], run.images) < 1e-6
    assert torch.equal(inputs["image_masks"], run.image_masks)
    assert max_diff(actions, batch["action"]) < 1e-6
    if not config["pi05"]:
        assert max_diff(inputs["state"], batch["observation.state"]) < 1e-6

    fused_calls = []
    monkeypatch.setattr(attention, "sdpa_attention", lambda *args: fused_calls.append(1) or sdpa_attention(*args))
    with torch.no_grad():
        loss = model(**inputs, actions=actions, noise=run.noise, time=run.time).loss.item()
    predicted = model.predict_action(**inputs, noise=run.noise)
    assert bool(fused_calls) == (attn == "sdpa")

    loss_diff, action_diff, scale = abs(loss - run.loss), max_diff(predicted, run.actions), run.actions.abs().max()
    print(f"\n{'pi05' if config['pi05'] else 'pi0'} {attn}: loss {loss:.6f} vs LeRobot {run.loss:.6f} "
          f"(|diff| {loss_diff:.2e}); actions max |diff| {action_diff:.2e} (range {scale:.2f})")  # fmt: skip
    assert predicted.shape == (BATCH, config["action_horizon"], config["action_dim"])
    if attn == "eager":
        assert loss_diff == 0.0 and action_diff == 0.0
    else:
        assert loss_diff < 1e-6 * abs(run.loss) and action_diff < 1e-6 * scale


@pytest.mark.parametrize("model_type", sorted(package_families()))
def test_sdpa_is_the_default_and_the_recipe_key_reaches_model_config_models(model_type: str, tmp_path: Path) -> None:
    """A model built from a recipe's ``model_config`` gets ``attn_implementation`` as from_pretrained would."""
    family = get_family(model_type)
    model_args = ModelArguments(model_config={"model_type": model_type, **copy.deepcopy(family.tiny_config)})
    model_class = family.model_class
    default = load_model(model_args, load_config(model_args), model_class, str(tmp_path))
    assert default.config._attn_implementation == "sdpa"
    model_args.attn_implementation = "eager"
    model = load_model(model_args, load_config(model_args), model_class, str(tmp_path))
    assert {sub.config._attn_implementation for sub in model.modules() if hasattr(sub, "config")} == {"eager"}


def test_default_config_has_lerobot_pi05_base_layout() -> None:
    """Built on the meta device, our defaults give LeRobot's real-size keys and shapes (pi05.md's 813 keys)."""
    from lerobot.policies.pi05.modeling_pi05 import PI05Config, PI05Policy

    lerobot_config = PI05Config(device="cpu")
    lerobot_config.device = "meta"  # LeRobot validates devices by name but moves the model to this one
    with torch.device("meta"):
        ours = Pi05ForActionPrediction(Pi05Config())
        theirs = PI05Policy(lerobot_config)
    shapes = {name: tuple(tensor.shape) for name, tensor in ours.state_dict().items()}
    assert len(shapes) == 813
    assert shapes == {name: tuple(tensor.shape) for name, tensor in theirs.state_dict().items()}
