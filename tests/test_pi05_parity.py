"""Parity with LeRobot itself: its tiny PI05Policy / PI0Policy, saved LeRobot-style, loaded by our model.

The same raw inputs (float images of odd sizes, state, task strings, actions) go through LeRobot's pre-processor and
policy and through our processor and model, with the same noise and time; windows have no padded steps (LeRobot
ignores ``action_is_pad``). Run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lerobot_pi05_reference import TINY_SIZES, build_reference

from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
from vla_recipes.models.pi05 import (
    TINY_PI0_CONFIG,
    TINY_PI05_CONFIG,
    Pi05Config,
    Pi05ForActionPrediction,
    Pi05Processor,
)
from vla_recipes.models.pi05.lerobot_format import LEROBOT_STATS_KEY

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


@pytest.mark.parametrize(("kind", "config"), [("pi05", TINY_PI05_CONFIG), ("pi0", TINY_PI0_CONFIG)])
def test_matches_lerobot(kind: str, config: dict, monkeypatch, tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = make_raw(config)
    reference = build_reference(kind, monkeypatch, tmp_path, tokenizer_dir, raw["stats"], config)
    batch = reference.preprocessor(
        {**raw["images"], "observation.state": raw["state"], "action": raw["actions"], "task": raw["tasks"]}
    )

    # The LeRobot folder loads as is; only the sizes its config.json cannot name are given.
    model = Pi05ForActionPrediction.from_pretrained(tmp_path, **TINY_SIZES).eval()
    assert model.config.pi05 == (kind == "pi05")
    assert model.config.norm_stats[LEROBOT_STATS_KEY]["action"]["q01"] == raw["stats"]["action"]["q01"].tolist()
    processor = Pi05Processor.from_model_config(model.config, build_gemma_like_tokenizer())
    inputs = processor(images=raw["images"], text=raw["tasks"], state=raw["state"])
    actions = processor.normalize_actions(raw["actions"])

    # Pre-processing: tokens exactly, images, state and actions to float rounding.
    assert torch.equal(inputs["input_ids"], batch["observation.language.tokens"])
    assert torch.equal(inputs["attention_mask"], batch["observation.language.attention_mask"])
    lerobot_images, lerobot_masks = reference.policy._preprocess_images(batch)
    assert max_diff(inputs["pixel_values"], torch.stack(lerobot_images, dim=1)) < 1e-6
    assert torch.equal(inputs["image_masks"], torch.stack(lerobot_masks, dim=1))
    assert max_diff(actions, batch["action"]) < 1e-6
    if kind == "pi0":
        assert max_diff(inputs["state"], batch["observation.state"]) < 1e-6

    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(BATCH, config["action_horizon"], 32, generator=generator)
    time = torch.rand(BATCH, generator=generator) * 0.999 + 0.001
    monkeypatch.setattr(reference.policy.model, "sample_noise", lambda shape, device: noise)
    monkeypatch.setattr(reference.policy.model, "sample_time", lambda size, device: time)
    with torch.no_grad():
        lerobot_loss, _ = reference.policy.forward(batch)
        loss = model(**inputs, actions=actions, noise=noise, time=time).loss
        lerobot_actions = reference.postprocessor(reference.policy.predict_action_chunk(batch, noise=noise))
    predicted = model.predict_action(**inputs, noise=noise)

    loss_diff, action_diff = abs(loss.item() - lerobot_loss.item()), max_diff(predicted, lerobot_actions)
    print(f"\n{kind}: loss {loss.item():.6f} vs LeRobot {lerobot_loss.item():.6f} (|diff| {loss_diff:.2e}); "
          f"actions max |diff| {action_diff:.2e} (range {lerobot_actions.abs().max().item():.2f})")  # fmt: skip
    assert loss.item() == pytest.approx(lerobot_loss.item(), rel=1e-5)
    assert predicted.shape == (BATCH, config["action_horizon"], config["action_dim"])
    assert action_diff < 1e-4


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
