"""Bad input on the input paths (issue 19, part B): recipe values transformers accepts but trains wrongly with, damaged
or missing dataset files, corrupt caches, and what a user hands the processors or ``recipes/evaluate.py``.

Each case ends as one line naming the culprit (``fails``: before the weights load, nothing written), or as correct
behaviour with a warning that names it. ``recipes/sft.py`` runs in process with the tripwire of test_bad_input.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import test_bad_input
import torch
import yaml
from cli import DEMOS, load_script
from test_bad_input import copy_dataset, fails, recipe_file

from vla_recipes.configs import RecipeError

CAMERA = "observation.images.image"
REPO = "local/synthetic_reach"
sft, tripwire = test_bad_input.sft, test_bad_input.tripwire  # its fixtures: sft.main, with load_model a tripwire

# --- the recipe --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({"camera_keys": []}, [], "camera_keys is empty: list the cameras the model sees"),
        ({"max_steps": 0}, [], "max_steps=0 trains nothing: set max_steps >= 1, or -1 to train num_train_epochs"),
        ({"save_strategy": "steps", "save_steps": 0}, [], "save_steps=0 with save_strategy: steps saves no checkpoint"),
        ({"per_device_train_batch_size": 0}, [], "per_device_train_batch_size must be >= 1, got 0"),
        ({"gradient_accumulation_steps": 0}, [], "gradient_accumulation_steps must be >= 1, got 0"),
        ({"learning_rate": -1e-3}, [], "learning_rate=-0.001 is negative"),
        ({}, ["--learning_rate", "-1e-3"], "learning_rate=-0.001 is negative"),  # argparse alone: "expected one arg"
    ],
)
def test_recipe_values_that_train_wrongly_are_refused(sft, tmp_path, dataset_root, overrides, extra, message):
    recipe = recipe_file(tmp_path, dataset_root, **overrides)
    fails(sft, tmp_path, ["--config", str(recipe), *extra], message, dataset_root, recipe)


def test_a_key_given_twice_is_refused_naming_both_lines(sft, tmp_path, dataset_root):
    recipe = recipe_file(tmp_path, dataset_root)
    lines = recipe.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("max_steps:")) + 1
    recipe.write_text("\n".join([*lines, "max_steps: 2", ""]))
    message = f"'max_steps' is given twice (lines {first} and {len(lines) + 1}); keep one"
    fails(sft, tmp_path, ["--config", str(recipe)], message, dataset_root, recipe)


def test_learning_rate_zero_is_a_warning(caplog):
    from vla_recipes.configs import VLATrainingArguments

    with caplog.at_level(logging.WARNING):
        VLATrainingArguments(output_dir="unused", learning_rate=0.0)
    assert "learning_rate is 0: the weights will not change" in caplog.text


def test_overlapping_train_and_eval_episodes_are_a_warning(sft, tmp_path, dataset_root, caplog):
    """A warning, not an error: evaluating on training episodes is a legitimate overfitting check."""
    recipe = recipe_file(tmp_path, dataset_root, train_episodes=["0:5"], eval_episodes=["3:6"])
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="load_model was reached"):
        sft.main(["--config", str(recipe)])
    assert "train_episodes and eval_episodes share episodes [3, 4]: the eval metrics include training data" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="load_model was reached"):
        sft.main(["--config", str(recipe), "--eval_episodes", "5:6"])
    assert "share episodes" not in caplog.text


# --- the dataset's files -----------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DATA = "data/chunk-000/file-000.parquet"
VIDEO = f"videos/{CAMERA}/chunk-000/file-000.mp4"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (_remove, DATA, f"data file {DATA} of the run's episodes is missing from '{{root}}' and cannot be downloaded "
         "(HF_HUB_OFFLINE is set)"),
        (_remove, VIDEO, f"video file {VIDEO} of the run's episodes is missing from '{{root}}' and cannot be"),
        (_remove, "meta/episodes", "in '{root}': meta/episodes/ is missing (or holds no parquet file); restore"),
        (_remove, "meta/tasks.parquet", "in '{root}': meta/tasks.parquet is missing; restore the file"),
        (_truncate, "meta/info.json", "in '{root}': meta/info.json is not valid JSON (truncated or corrupt: "),
        (_truncate, EPISODES, f"in '{{root}}': {EPISODES} is corrupt or truncated (Parquet magic bytes not found"),
        (_truncate, DATA, f"data file '{{root}}/{DATA}' is corrupt or truncated (Could not open Parquet input"),
    ],
)  # fmt: skip
def test_missing_or_corrupt_dataset_file_is_named(sft, tmp_path, dataset_root, damage, file, message):
    """Before: an offline-mode traceback or ConnectError for a missing file (a video only after the model loaded),
    "set dataset_root" when it is set, a raw JSONDecodeError / ArrowInvalid for a corrupt one."""
    root = copy_dataset(dataset_root, tmp_path)
    damage(root / file)
    fails(sft, tmp_path, ["--config", str(recipe_file(tmp_path, str(root)))], message.format(root=root), root)


def test_missing_data_file_with_the_hub_unreachable(tmp_path, dataset_root, monkeypatch):
    from cli import free_port
    from huggingface_hub import constants

    from vla_recipes.configs import DataArguments
    from vla_recipes.data.lerobot import check_episode_data, load_metadata

    root = copy_dataset(dataset_root, tmp_path)
    args = DataArguments(dataset_repo_id=REPO, dataset_root=str(root))
    meta = load_metadata(args)
    (root / DATA).unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RecipeError, match=f"data file {DATA} of the run's episodes is missing from .* and cannot be"):
        check_episode_data(meta, args, [0, 1])


def test_empty_task_is_refused(sft, tmp_path, dataset_root):
    """A LeRobot dataset gives every episode an instruction: an empty one is a broken conversion."""
    root = copy_dataset(dataset_root, tmp_path)
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    tasks.index = pd.Index([""] * len(tasks), name="task")
    tasks.to_parquet(root / "meta/tasks.parquet")
    message = "task_index 0 of meta/tasks.parquet is empty, and episodes [0, 1, 2, 3, 4, 5] use it"
    fails(sft, tmp_path, ["--config", str(recipe_file(tmp_path, str(root)))], message, root)


def test_task_whose_prompt_does_not_fit_the_model(sft, tmp_path, dataset_root, two_camera_root):
    """OpenVLA: image patches + prompt + action tokens past the LLM's positions; pi0.5: a prompt (task and the
    longest state text) over tokenizer_max_length, which the processor used to cut silently."""
    root = copy_dataset(dataset_root, tmp_path)
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    tasks.index = pd.Index(["pick up the cube " * 125], name="task")  # 2125 characters: one token each
    tasks.to_parquet(root / "meta/tasks.parquet")
    message = "takes 2246 tokens, more than the language model's max_position_embeddings=2048"
    fails(sft, tmp_path, ["--config", str(recipe_file(tmp_path, str(root)))], message, root)

    pi05 = {**DEMOS["pi05"]["model_config"], "tokenizer_max_length": 80}
    recipe = recipe_file(tmp_path, two_camera_root, "pi05", model_config=pi05, train_episodes=["0:3"])
    message = "the prompt of the dataset task 'move the gripper to the red cube' takes 89 tokens, more than the "
    text = fails(sft, tmp_path, ["--config", str(recipe), "--eval_episodes", "3:4"], message, two_camera_root)
    assert "tokenizer_max_length=80; shorten the task, or raise tokenizer_max_length" in text


# --- the caches --------------------------------------------------------------------------------------------------


def test_corrupt_frame_cache_entry_is_rebuilt(dataset_root, tmp_path, caplog):
    from vla_recipes.configs import DataArguments
    from vla_recipes.data.lerobot import VLADataset, load_metadata

    args = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root, frame_cache_dir=str(tmp_path)
    )
    meta = load_metadata(args)
    first = VLADataset(meta, args, [CAMERA], [0, 1])
    expected = [first[i]["images"][0] for i in (0, 20, 31)]
    (entry,) = tmp_path.glob("*.npy")
    _truncate(entry)
    with caplog.at_level(logging.WARNING):
        again = VLADataset(meta, args, [CAMERA], [0, 1])
    assert f"frame cache: {entry} ({CAMERA}) is corrupt: " in caplog.text and "rebuilding it" in caplog.text
    for i, image in zip((0, 20, 31), expected, strict=True):
        assert torch.equal(again[i]["images"][0], image)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        VLADataset(meta, args, [CAMERA], [0, 1])
    assert "frame cache: reusing" in caplog.text and "is corrupt" not in caplog.text


def test_corrupt_statistics_cache_entry_is_computed_again(dataset_root, tmp_path, caplog):
    from vla_recipes.configs import DataArguments
    from vla_recipes.data.lerobot import load_metadata
    from vla_recipes.data.stats import norm_stats_entry

    args = DataArguments(
        dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root, stats_cache_dir=str(tmp_path)
    )
    meta = load_metadata(args)
    expected = norm_stats_entry(meta, args, "quantiles", [0, 1, 2])
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2  # action and state
    _truncate(entries[0])
    stale = json.loads(entries[1].read_text())
    stale["stats"]["q99"] = stale["stats"]["q99"][:-1]  # an edited entry: one dim short
    entries[1].write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING):
        assert norm_stats_entry(meta, args, "quantiles", [0, 1, 2]) == expected
    assert caplog.text.count("is corrupt; computing it again") == 2
    assert all(json.loads(path.read_text())["stats"] for path in entries)  # replaced by good entries


# --- what a user hands the processors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors():
    """The demo models' processors (OpenVLA; pi0.5 on identity normalisation, 8-dim state)."""
    from transformers import AutoConfig

    from vla_recipes.data.normalize import Normalizer
    from vla_recipes.families import get_family
    from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
    from vla_recipes.models.pi05 import Pi05ImageProcessor, Pi05Processor

    openvla = get_family("openvla").new_processor(AutoConfig.for_model(**DEMOS["openvla"]["model_config"]), None)
    pi05 = Pi05Processor(
        Pi05ImageProcessor(image_size=32, camera_keys=[CAMERA]), build_gemma_like_tokenizer(), max_length=64
    )
    pi05.normalizer = Normalizer("identity")
    return openvla, pi05


def _image(**kw) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0), **kw)


PI05_ONLY = "pi05 only"  # a state, or a prompt length limit: OpenVLA has neither (its window is checked in sft.py)


@pytest.mark.parametrize(
    ("images", "task", "state", "message"),
    [
        ([_image()], ["pick"], None, None),  # good input passes
        ([torch.full((3, 32, 32), 200, dtype=torch.uint8)], ["pick"], None, None),
        ([_image().index_put_((torch.tensor(0),), torch.tensor(float("nan")))], ["pick"], None, "image 0 has NaN"),
        ([_image(), _image() * 255], ["a", "b"], None, "image 1 is float with values in ["),
        ([_image()], [""], None, "task 0 is '': pass the instruction"),
        ([], [], None, "no tasks: pass at least one sample"),
        ([_image()], ["pick"], [[0.0] * 7 + [float("nan")]], PI05_ONLY + "state of samples [0] has NaN or inf values"),
        ([_image()], ["pick it up " * 5], None, PI05_ONLY + "more than the model's tokenizer_max_length=64; shorten"),
    ],
)
def test_processors_refuse_bad_input(processors, images, task, state, message):
    """Before: NaN became a black pixel or the top state bin, 0..255 saturated to white, an empty task or an empty
    batch went through (or died in torch.stack), a long pi0.5 prompt lost its state and "Action:" to truncation."""
    openvla, pi05 = processors
    state = state or [[0.0] * 8] * len(images)
    calls = [lambda: pi05(images=[[image] for image in images], text=task, state=state)]
    if not (message or "").startswith(PI05_ONLY):
        calls.append(lambda: openvla(images=images, text=task))
    for call in calls:
        if message is None:
            assert call()["pixel_values"].shape[0] == len(images)
        else:
            with pytest.raises(ValueError) as error:
                call()
            assert message.removeprefix(PI05_ONLY) in str(error.value)


def test_empty_image_batch_to_the_image_processors(processors):
    for processor in processors:
        with pytest.raises(ValueError, match="no images: pass at least one sample"):
            processor.image_processor([])


def test_openvla_refuses_a_sequence_past_its_positions(processors):
    """Image patches + prompt + action tokens past max_position_embeddings: RoPE positions it never trained on."""
    from transformers import AutoConfig

    from vla_recipes.models.openvla import OpenVLAForActionPrediction

    demo = DEMOS["openvla"]["model_config"]
    config = AutoConfig.for_model(**{**demo, "text_config": {**demo["text_config"], "max_position_embeddings": 96}})
    config.action_dim, config.action_horizon = 7, 1
    torch.manual_seed(0)
    model = OpenVLAForActionPrediction(config).eval()
    inputs = processors[0](images=[_image()], text=["pick"])  # 64 patches + 53 prompt tokens
    message = "the sequence is 124 tokens (image patches, prompt and action tokens), more than the language model's"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.generate_action_ids(**inputs)
    with pytest.raises(ValueError, match="max_position_embeddings=96; shorten the instruction"):
        model(**inputs)


# --- recipes/evaluate.py -----------------------------------------------------------------------------------------


def test_evaluate_refuses_a_missing_model_and_a_dataset_of_other_dims(tmp_path, dataset_root):
    """Before: an OSError traceback for the path; for other action dims, every frame predicted then a broadcast
    traceback. Both now fail before any weight loads (the folder has a config only)."""
    from transformers import AutoConfig

    evaluate = load_script("evaluate")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_repo_id": "local/synthetic_reach", "dataset_root": dataset_root}))
    args = ["--config", str(recipe), "--episodes", "5", "--num_workers", "0"]
    with pytest.raises(RecipeError, match=r"--model '.*nowhere' is not a folder here, and not a model the Hub gives"):
        evaluate.main(["--model", str(tmp_path / "nowhere"), *args])

    config = AutoConfig.for_model(**DEMOS["openvla"]["model_config"])
    config.camera_keys, config.action_dim, config.action_horizon = [CAMERA], 5, 1
    config.save_pretrained(tmp_path / "model")
    with pytest.raises(RecipeError, match="the dataset's 'action' has 7 dims but the model predicts 5: evaluate on"):
        evaluate.main(["--model", str(tmp_path / "model"), *args])
    assert not (tmp_path / "model" / "eval_results.json").exists()


def test_evaluate_recipe_with_a_key_given_twice(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_repo_id: a/b\nepisodes: 3\ndataset_repo_id: c/d\n")
    with pytest.raises(RecipeError, match=r"'dataset_repo_id' is given twice \(lines 1 and 3\)"):
        load_script("evaluate").main(["--model", "unused", "--config", str(recipe)])
