"""``accelerate launch recipes/sft.py`` end to end, as a user runs it, and its reloadable output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli import DEMOS, ROOT, accelerate_launch, run


def write_recipe(tmp_path: Path, dataset_root: str, demo: str = "openvla", **overrides) -> Path:
    """The demo recipe of ``demo`` shrunk to the test datasets (6 episodes) and a few steps."""
    recipe = {
        **DEMOS[demo],
        "dataset_root": dataset_root,
        "train_episodes": ["0:5"],
        "eval_episodes": ["5:6"],
        "output_dir": str(tmp_path / "out"),
        "max_steps": 60,
        "per_device_train_batch_size": 8,
        "logging_steps": 10,
        "eval_steps": 30,
        "dataloader_num_workers": 0,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(recipe: Path, *extra: str, accelerate: bool = True) -> subprocess.CompletedProcess:
    """Run the recipe as a user would; without ``accelerate`` the script's own stderr is all there is."""
    if accelerate:
        return accelerate_launch("recipes/sft.py", "--config", str(recipe), *extra)
    return run([sys.executable, str(ROOT / "recipes/sft.py"), "--config", str(recipe), *extra])


def logged(output_dir: Path, key: str) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def test_sft_trains_saves_and_reloads(tmp_path, dataset_root):
    from transformers import AutoModel, AutoProcessor

    import vla_recipes  # noqa: F401

    run = launch(write_recipe(tmp_path, dataset_root))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"

    losses, accuracy = logged(out, "loss"), logged(out, "action_accuracy")
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert accuracy[-1] > 0.1 > 2 / 256, accuracy  # far above chance (1/256 per token)
    assert "eval_action_accuracy" in json.loads((out / "eval_results.json").read_text())
    card = (out / "README.md").read_text()
    assert "pipeline_tag: robotics" in card and "local/synthetic_reach" in card

    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.norm_stats["local/synthetic_reach"]["action"]["mask"] == [True] * 6 + [False]
    assert model.config.camera_keys == ["observation.images.image"]
    images = [torch.rand(3, 64, 64) for _ in range(3)]
    tasks = ["move the gripper to the red cube", "go", "move the gripper to the red cube please"]
    batched = model.predict_action(**processor(images=images, text=tasks))
    assert batched.shape == (3, 1, 7)
    pairs = zip(images, tasks, strict=True)
    one_by_one = torch.cat([model.predict_action(**processor(images=[i], text=[t])) for i, t in pairs])
    torch.testing.assert_close(batched, one_by_one)


def test_pi05_sft_trains_saves_and_reloads(tmp_path, two_camera_root):
    from transformers import AutoModel, AutoProcessor

    import vla_recipes  # noqa: F401

    recipe = write_recipe(
        tmp_path,
        two_camera_root,
        "pi05",
        train_episodes=["0:3"],
        eval_episodes=["3:4"],
        max_steps=80,
        learning_rate=1e-3,
    )
    run = launch(recipe)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    losses = logged(out, "loss")  # the velocity MSE (noisy: a random t per sample) falls from its noise level
    assert sum(losses[-2:]) < 0.75 * sum(losses[:2]), losses

    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.camera_keys == ["observation.images.image", "observation.images.wrist_image"]
    assert model.config.norm_mode == "quantiles" and model.config.action_horizon == 10
    images = [[torch.rand(3, 64, 64), torch.rand(3, 64, 64)] for _ in range(3)]
    tasks = ["move the gripper to the red cube"] * 3
    state = torch.rand(3, 8)
    noise = torch.randn(3, 10, model.config.max_action_dim)
    batched = model.predict_action(**processor(images=images, text=tasks, state=state), noise=noise)
    assert batched.shape == (3, 10, 7)
    one_by_one = torch.cat(
        [
            model.predict_action(
                **processor(images=[images[i]], text=[tasks[i]], state=state[i : i + 1]), noise=noise[i : i + 1]
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({"lerning_rate": 0.1}, [], "error: unknown recipe key in the recipe YAML: 'lerning_rate'"),
        ({}, ["--camera_keys", "observation.images.top"], "camera_keys: 'observation.images.top' is not a camera"),
        ({}, ["--state_key", "observation.joint_pos"], "state_key: 'observation.joint_pos' is not a feature"),
        ({}, ["--finetune_mode", "expert_only"], "finetune_mode='expert_only' is not available for this model"),
    ],
)
def test_bad_recipe_fails_fast_naming_the_culprit(tmp_path, dataset_root, overrides, extra, message):
    run = launch(write_recipe(tmp_path, dataset_root, **overrides), *extra, accelerate=False)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr  # one clear line, not a stack trace
    assert not (tmp_path / "out").exists()  # failed before any work


def test_existing_output_dir_is_not_overwritten(tmp_path, dataset_root):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("a previous run")
    run = launch(write_recipe(tmp_path, dataset_root), accelerate=False)
    assert run.returncode != 0
    assert "exists and is not empty; set overwrite_output_dir: true" in run.stderr
    assert (out / "precious.txt").read_text() == "a previous run"
