"""Atomic checkpoints and exact resume: a run killed at any moment resumes as if it had never stopped.

Which checkpoint a resume picks, resume errors, per-sample augmentation, a NaN loss stopping a run. That
``recipes/sft.py`` SIGKILLed mid-save and resumed with ``--resume_from_checkpoint true`` logs the same losses and ends
with the same weights as an uninterrupted run is the family contract's, for every registered family
(tests/test_family_contract.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vla_recipes.checkpointing import (
    COMPLETE_MARK,
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


def nan_trainer(out, nan_at: int, **schedule):
    """A VLATrainer on toy regression data whose model's loss turns NaN at call ``nan_at``."""
    from vla_recipes.trainers.base import VLATrainer

    args = VLATrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True, report_to="none",
        disable_tqdm=True, **schedule,
    )  # fmt: skip
    data = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(32)]
    return VLATrainer(model=NaNAtCall(nan_at=nan_at), args=args, train_dataset=data)


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from vla_recipes.trainers.base import NonFiniteError

    out = tmp_path / "out"
    trainer = nan_trainer(out, nan_at=5, max_steps=8, save_steps=2, logging_steps=1)
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


@pytest.mark.parametrize(("nan_at", "stopped_at"), [(5, 6), (7, 8)])
def test_nan_loss_is_read_before_the_next_log_or_save_not_every_step(tmp_path, nan_at, stopped_at):
    """The loss is checked on the host only before a log (every 3 steps) or a save (every 4), not each step (a host
    sync): a NaN at step 5 stops the run at the log of step 6, one at step 7 at step 8, before its checkpoint is
    written; the message names the step the loss went bad."""
    from vla_recipes.trainers.base import NonFiniteError

    out = tmp_path / "out"
    trainer = nan_trainer(out, nan_at=nan_at, max_steps=10, save_steps=4, logging_steps=3)
    with pytest.raises(NonFiniteError, match=f"the training loss is nan at step {nan_at};"):
        trainer.train()
    assert trainer.state.global_step == stopped_at
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]  # nothing saved after the NaN
    assert not any(math.isnan(entry.get("loss", 0.0)) for entry in trainer.state.log_history)  # nor logged


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
