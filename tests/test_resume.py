"""Atomic checkpoints and exact resume: a run killed at any moment resumes as if it had never stopped.

Fast: which checkpoint a resume picks, resume errors, per-sample augmentation, a NaN loss stopping a run.
Slow: ``recipes/sft.py`` SIGKILLed mid-save and resumed with ``--resume_from_checkpoint true`` logs the same
losses and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from cli import DEMOS, accelerate_launch
from torch import nn

from vla_recipes.checkpointing import (
    COMPLETE_MARK,
    checkpoints,
    incomplete_checkpoints,
    is_complete,
    mark_complete,
    remove_incomplete_checkpoints,
    resolve_resume,
)
from vla_recipes.configs import DataArguments, RecipeError, VLATrainingArguments, check_output_dir


def make_checkpoints(out: Path, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half" if step in incomplete else b"whole")
        if step in complete:
            mark_complete(folder, step)


def test_resume_picks_the_newest_complete_checkpoint_by_step(tmp_path):
    make_checkpoints(tmp_path, complete=[3, 9, 10], incomplete=[11, 13])
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-10")  # not -9 (string order), not -13
    assert resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path) == str(tmp_path / "checkpoint-9")
    assert resolve_resume(None, tmp_path) is None and resolve_resume(False, tmp_path) is None
    assert json.loads((tmp_path / "checkpoint-10" / COMPLETE_MARK).read_text())["global_step"] == 10
    assert not list((tmp_path / "checkpoint-10").glob("*.tmp"))

    assert incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-11", tmp_path / "checkpoint-13"]
    remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3", "checkpoint-9"]
    assert all(is_complete(p) for p in tmp_path.iterdir())


def test_resume_errors_name_what_was_found_and_the_fix(tmp_path):
    with pytest.raises(RecipeError, match=r"holds no complete checkpoint \(none\); drop resume_from_checkpoint"):
        resolve_resume(True, tmp_path / "missing")
    make_checkpoints(tmp_path, complete=[], incomplete=[6])
    with pytest.raises(RecipeError, match=r"only incomplete ones \['checkpoint-6'\] \(killed while saving\)"):
        resolve_resume(True, tmp_path)
    make_checkpoints(tmp_path, complete=[3], incomplete=[])
    with pytest.raises(RecipeError, match=r"checkpoint-6' is not a complete checkpoint .*resume from '.*checkpoint-3'"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    with pytest.raises(RecipeError, match="is not a folder"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("True", True), ("false", None), ("out/c-3", "out/c-3")]
)
def test_resume_flag_from_the_command_line(tmp_path, monkeypatch, value, expected):
    monkeypatch.chdir(tmp_path)
    args = VLATrainingArguments(output_dir="out", resume_from_checkpoint=value)
    assert args.resume_from_checkpoint == expected
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "trainer_state.json").write_text("{}")  # a previous run's folder
    if expected is None:
        with pytest.raises(RecipeError, match="exists and is not empty"):
            check_output_dir(args)
    else:
        check_output_dir(args)  # resuming it (out/c-3 is one of its checkpoints) writes into it


def test_augmentation_is_a_function_of_seed_epoch_and_index(dataset_root):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from vla_recipes.data.lerobot import VLADataset

    data_args = DataArguments(dataset_repo_id="local/synthetic_reach", dataset_root=dataset_root)
    meta = LeRobotDatasetMetadata(data_args.dataset_repo_id, root=dataset_root)
    keys = ["observation.images.image"]
    dataset = VLADataset(meta, data_args, keys, [0, 1], augment=True, seed=7)
    plain = VLADataset(meta, data_args, keys, [0, 1])

    def image(ds, idx: int, epoch: int = 0) -> torch.Tensor:
        ds.set_epoch(epoch)
        return ds[idx]["images"][0]

    torch.manual_seed(0)
    first = image(dataset, 5)
    state = torch.random.get_rng_state()
    torch.manual_seed(123)  # another global RNG stream
    again = image(dataset, 5)
    assert torch.equal(first, again)
    torch.manual_seed(0)
    image(dataset, 5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left alone
    assert not torch.equal(first, image(plain, 5))  # augmented at all
    assert not torch.equal(first, image(dataset, 5, epoch=1))  # a new draw each epoch
    assert not torch.equal(first, image(dataset, 6))  # and each sample
    other_seed = VLADataset(meta, data_args, keys, [0, 1], augment=True, seed=8)
    assert not torch.equal(first, image(other_seed, 5))

    # In a DataLoader worker process (its own RNG seeded by the loader) the sample is the same.
    dataset.set_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[6, 5], num_workers=1)
    from_worker = [sample["images"][0] for sample in loader]
    assert torch.equal(from_worker[1], image(dataset, 5, epoch=1))
    assert torch.equal(from_worker[0], image(dataset, 6, epoch=1))


class NaNAtCall(nn.Module):
    """A toy model whose training loss is NaN at its k-th training forward (the k-th optimizer step)."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.nan_at, self.calls = nan_at, 0

    def forward(self, x, y):
        loss = ((x * self.weight).sum(-1) - y).pow(2).mean()
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                loss = loss * float("nan")
        return {"loss": loss}


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from vla_recipes.trainers.base import NonFiniteError, VLATrainer

    out = tmp_path / "out"
    args = VLATrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=2, save_steps=2, logging_steps=1,
        learning_rate=1e-2, use_cpu=True, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    data = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(32)]
    trainer = VLATrainer(model=NaNAtCall(nan_at=5), args=args, train_dataset=data)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "the training loss is nan at step 5" in message, message
    assert f"the last good checkpoint is '{out / 'checkpoint-4'}'" in message, message
    assert isinstance(error.value, RecipeError)  # sft.py prints it as one line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # nothing saved after
    assert all(is_complete(p) for p in out.iterdir())
    from safetensors.torch import load_file

    assert torch.isfinite(load_file(out / "checkpoint-4" / "model.safetensors")["weight"]).all()


class EpochLog(torch.utils.data.Dataset):
    """8 toy samples that record every ``set_epoch`` call."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, idx: int) -> dict:
        return {"x": torch.full((4,), float(idx)), "y": torch.tensor(1.0)}


def test_trainer_sets_the_dataset_epoch_also_after_a_resume(tmp_path):
    from transformers import TrainerControl, TrainerState

    from vla_recipes.trainers.base import VLATrainer

    def distinct(epochs: list[int]) -> list[int]:  # accelerate also calls set_epoch when its sampler has none
        return [e for i, e in enumerate(epochs) if i == 0 or epochs[i - 1] != e]

    args = VLATrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, save_steps=6, use_cpu=True,
        report_to="none", disable_tqdm=True,
    )  # fmt: skip
    dataset = EpochLog()  # 4 steps per epoch
    VLATrainer(model=NaNAtCall(nan_at=0), args=args, train_dataset=dataset).train()
    assert distinct(dataset.epochs) == [0, 1, 2]
    resumed = EpochLog()
    trainer = VLATrainer(model=NaNAtCall(nan_at=0), args=args, train_dataset=resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert distinct(resumed.epochs) == [1, 2]  # checkpoint-6 is mid-epoch 1

    # Multi-process, accelerate leaves it to the Trainer (its seedable sampler has set_epoch): the Trainer's callback.
    told = EpochLog()
    VLATrainer(model=NaNAtCall(nan_at=0), args=args, train_dataset=told).callback_handler.on_epoch_begin(
        args, TrainerState(epoch=1.5), TrainerControl()
    )
    assert told.epochs == [1]


# ---------------------------------------------------------------- slow: kill with SIGKILL mid-save, then resume

CASES = {
    "openvla-full-1proc-1worker": ("openvla", "full", "single_gpu.yaml", 1),
    "openvla-lora-2proc": ("openvla", "lora", "multi_cpu.yaml", 0),
    "pi05-full-2proc": ("pi05", "full", "multi_cpu.yaml", 0),
    "pi05-lora-1proc": ("pi05", "lora", "single_gpu.yaml", 0),
}
KILL_AT = 6  # kill the moment checkpoint-6 appears, i.e. while it is being written


def write_recipe(folder: Path, dataset_root: str, demo: str, mode: str, processes: int, workers: int) -> Path:
    """10 steps over 32 frames (2 to 5 epochs), saving every 3 steps, keeping 2, augmented images."""
    recipe = {
        **DEMOS[demo],
        "finetune_mode": mode,
        "dataset_root": dataset_root,
        "camera_keys": ["observation.images.image"],
        "train_episodes": ["0:2"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "image_augmentation": True,
        "per_device_train_batch_size": 8 // processes,
        "max_steps": 10,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "save_total_limit": 2,
        "dataloader_num_workers": workers,
        "output_dir": str(folder / "out"),
        "disable_tqdm": True,
    }
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, sorted(p.name for p in out.iterdir())
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def cut_short(folder: Path) -> None:
    """Make ``folder`` what a kill while writing its weights leaves: the weights cut short, no completion mark."""
    (folder / COMPLETE_MARK).unlink(missing_ok=True)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, dataset_root, case):
    demo, mode, config, workers = CASES[case]
    processes = 2 if config == "multi_cpu.yaml" else 1

    def launch(folder: str, *extra: str, until=None):
        recipe = write_recipe(tmp_path / folder, dataset_root, demo, mode, processes, workers)
        command = ("recipes/sft.py", "--config", str(recipe), *extra)
        # One thread per process: a tiny model gains nothing from more, and spinning threads slow a busy machine.
        env = {"OMP_NUM_THREADS": "1"}
        return accelerate_launch(*command, config=config, timeout=300, until=until, env=env)

    out = tmp_path / "resumed" / "out"
    with ThreadPoolExecutor(2) as pool:  # the reference and the run to kill side by side: the CI machine has 2 cores
        reference = pool.submit(launch, "reference")
        killed = pool.submit(launch, "resumed", until=lambda: (out / f"checkpoint-{KILL_AT}").exists())
        reference, killed = reference.result(), killed.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    # A tiny model saves in ~25 ms, often faster than the kill lands (later still on a busy machine): then cut the
    # newest checkpoint as a kill while writing it would have left it.
    *older, newest = checkpoints(out)
    killed_mid_save = not is_complete(newest)
    cut_short(newest)
    resumed_from = resolve_resume(True, out)
    assert resumed_from == str(older[-1]), (older, newest)
    shutil.copytree(resumed_from, out / "checkpoint-13")  # left by a longer run: newer than any step here
    cut_short(out / "checkpoint-13")

    resumed = launch("resumed", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Only complete checkpoints are left, the newest two (save_total_limit), half-written ones gone.
    left = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in left] == ["checkpoint-9", "checkpoint-10"], left
    assert all(is_complete(p) for p in left)

    expected, got = losses(tmp_path / "reference" / "out"), losses(out)
    assert sorted(expected) == sorted(got) == list(range(1, 11)), (expected, got)
    loss_diff = max(abs(expected[s] - got[s]) for s in expected)
    weights_ref, weights = final_weights(tmp_path / "reference" / "out"), final_weights(out)
    assert weights_ref.keys() == weights.keys()
    weight_diff = max((weights_ref[k].float() - weights[k].float()).abs().max().item() for k in weights)
    print(
        f"\n{case}: killed while saving {newest.name}: {killed_mid_save}, resumed from {Path(resumed_from).name}, "
        f"max abs diff: losses {loss_diff}, weights {weight_diff}"
    )
    assert loss_diff <= 1e-6, (expected, got)
    assert weight_diff <= 1e-6
