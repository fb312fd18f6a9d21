"""Nothing lost, nothing silent on the run and resume paths (issue 19, part A).

Each test is a careless user's command on the tiny demo recipe (3-step runs, in process: ~2 s each): a finished
run is never overwritten without being asked, two runs cannot share a folder, a killed run leaves no stuck lock,
a resume says what it resumed and refuses what it cannot continue exactly, and a LoRA folder loads after ``mv``,
from another working directory and from the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli import DEMOS, load_script, run
from safetensors.torch import load_file
from test_convert_openvla import tiny_7b_layout_state_dict, write_openvla_folder

from vla_recipes.configs import RUN_LOCK_NAME, RecipeError
from vla_recipes.output_dir import OutputDirLock

SFT = load_script("sft")


def recipe(tmp_path: Path, dataset_root: str, out: Path, **overrides) -> str:
    """The OpenVLA demo recipe cut to a 3-step run saving every 2 steps; returns the YAML's path."""
    values = {
        **DEMOS["openvla"],
        "dataset_root": dataset_root,
        "train_episodes": ["0:5"],
        "eval_episodes": None,
        "eval_strategy": "no",
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "warmup_steps": 0,
        "save_strategy": "steps",
        "save_steps": 2,
        "dataloader_num_workers": 0,
        "lora_r": 4,
        "disable_tqdm": True,
        **overrides,
    }
    path = tmp_path / f"recipe-{out.name}-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def train(tmp_path: Path, dataset_root: str, out: Path, *cli: str, **overrides) -> Path:
    SFT.main(["--config", recipe(tmp_path, dataset_root, out, **overrides), *cli])
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def logged(out: Path, key: str) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- output folder: what may be written over


def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(tmp_path, dataset_root):
    finished = train(tmp_path, dataset_root, tmp_path / "finished")
    other = train(tmp_path, dataset_root, tmp_path / "other", seed=1)
    before = weights(finished)
    with pytest.raises(RecipeError) as error:  # before: other's checkpoint overwrote `finished`, exit 0
        train(tmp_path, dataset_root, finished, "--resume_from_checkpoint", str(other / "checkpoint-2"))
    message = one_line(error)
    assert f"output_dir {str(finished)!r} holds another run" in message and "overwrite_output_dir" in message
    assert all(torch.equal(before[k], v) for k, v in weights(finished).items())
    # With overwrite_output_dir, another run's checkpoint replaces it (nothing stale left). (Its own checkpoints
    # continue it: test_resume.py::test_resume_flag_from_the_command_line.)
    train(tmp_path, dataset_root, finished, "--resume_from_checkpoint", str(other / "checkpoint-2"),
          "--overwrite_output_dir", "true", "--max_steps", "5", seed=1)  # fmt: skip
    assert sorted(p.name for p in finished.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_overwrite_leaves_nothing_stale_and_resume_names_its_checkpoint(tmp_path, dataset_root, caplog):
    out = train(tmp_path, dataset_root, tmp_path / "out", max_steps=4)
    assert (out / "checkpoint-4").is_dir()
    train(tmp_path, dataset_root, out, "--overwrite_output_dir", "true", max_steps=3)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # before: -4 too
    shutil.rmtree(out / "checkpoint-3")  # preempted after its step-2 save
    caplog.set_level(logging.INFO)
    # A requeue keeps overwrite_output_dir from the recipe: resuming wins, nothing is deleted.
    requeue = ("--resume_from_checkpoint", "true", "--overwrite_output_dir", "true")
    train(tmp_path, dataset_root, out, *requeue, max_steps=3)
    assert f"resuming from {out / 'checkpoint-2'} (global step 2)" in caplog.text
    assert logged(out, "loss").keys() == {1, 2, 3}


# ---------------------------------------------------------------- the lock: one run per folder, never stuck

HOLDER = """
import sys, time
from vla_recipes.output_dir import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("holding", flush=True)
time.sleep(120)
"""


def test_two_runs_cannot_share_a_folder_and_a_killed_run_leaves_no_lock(tmp_path, dataset_root):
    out, release = tmp_path / "out", threading.Event()
    holder = threading.Thread(
        target=lambda: run([sys.executable, "-c", HOLDER, str(out)], timeout=120, until=release.is_set), daemon=True
    )
    holder.start()  # another run, started a moment earlier, holding the folder
    deadline = time.monotonic() + 60
    while "pid" not in ((out / RUN_LOCK_NAME).read_text() if (out / RUN_LOCK_NAME).exists() else ""):
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    holder_pid = (out / RUN_LOCK_NAME).read_text().split()[1]
    with pytest.raises(RecipeError) as error:  # before: both passed the start check and both exited 0
        train(tmp_path, dataset_root, out)
    message = one_line(error)
    assert f"output_dir {str(out)!r} is in use by another run (pid {holder_pid} on " in message
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK_NAME]  # the refused run wrote nothing

    release.set()  # the holder is SIGKILLed: no cleanup of its own ran
    holder.join(timeout=60)
    train(tmp_path, dataset_root, out)  # the OS dropped its lock: not stuck
    assert (out / "model.safetensors").is_file() and not (out / RUN_LOCK_NAME).exists()  # released at the end


def test_a_filesystem_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some shared filesystems (Lustre, NFS mounts without locking) refuse flock: the run goes on, and says so."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="vla_recipes.output_dir"), OutputDirLock(tmp_path / "out"):
        assert not (tmp_path / "out" / RUN_LOCK_NAME).exists()
    assert "cannot be locked (No locks available): a second run into it would not be refused" in caplog.text


@pytest.mark.slow
def test_a_multi_process_run_takes_the_lock_once(tmp_path, dataset_root):
    """2 CPU ranks: only the main process locks (no deadlock on its own lock); into a held folder every rank stops
    with the main's one-line error instead of hanging in a collective."""
    from cli import accelerate_launch

    out = tmp_path / "out"
    config = recipe(tmp_path, dataset_root, out, finetune_mode="lora", max_steps=2, per_device_train_batch_size=2)
    launch = {"config": "multi_cpu.yaml", "timeout": 300, "env": {"OMP_NUM_THREADS": "1"}}
    with OutputDirLock(out):
        held = accelerate_launch("recipes/sft.py", "--config", config, **launch)
    assert held.returncode != 0
    assert held.stderr.count(f"error: output_dir {str(out)!r} is in use by another run (pid {os.getpid()} on ") == 2
    free = accelerate_launch("recipes/sft.py", "--config", config, **launch)
    assert free.returncode == 0, free.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and not (out / RUN_LOCK_NAME).exists()


def test_an_unwritable_output_dir_is_one_line(tmp_path, dataset_root):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RecipeError, match=r"output_dir '.*a_file/out' cannot be written \(.*\); choose a folder"):
        train(tmp_path, dataset_root, tmp_path / "a_file" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tmp_path, dataset_root):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(RecipeError, match=r"output_dir '.*ro' cannot be written \(Permission denied\)"):
        train(tmp_path, dataset_root, tmp_path / "ro")


# ---------------------------------------------------------------- resume: refuse what cannot continue exactly


@pytest.fixture
def three_steps(tmp_path, dataset_root) -> Path:
    return train(tmp_path, dataset_root, tmp_path / "out")


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_resume_without_optimizer_state_is_refused(tmp_path, dataset_root, three_steps, missing):
    (three_steps / "checkpoint-2" / missing).unlink()
    checkpoint = str(three_steps / "checkpoint-2")
    with pytest.raises(RecipeError) as error:  # before: AdamW and the LR schedule silently restarted
        train(tmp_path, dataset_root, three_steps, "--resume_from_checkpoint", checkpoint)
    message = one_line(error)
    assert f"{checkpoint!r} has no {missing}: resuming would restart the optimizer and the LR schedule" in message


def test_resume_with_a_changed_learning_rate_warns_and_keeps_the_schedule(tmp_path, dataset_root, caplog):
    reference = train(tmp_path, dataset_root, tmp_path / "reference", lr_scheduler_type="linear")
    out = train(tmp_path, dataset_root, tmp_path / "out", lr_scheduler_type="linear")
    caplog.set_level(logging.WARNING)
    train(tmp_path, dataset_root, out, "--resume_from_checkpoint", str(out / "checkpoint-2"),
          "--learning_rate", "0.5", lr_scheduler_type="linear")  # fmt: skip
    assert "learning_rate 0.001 -> 0.5; the checkpoint's optimizer and LR scheduler are restored" in caplog.text
    assert logged(out, "learning_rate")[3] == logged(reference, "learning_rate")[3] > 0  # transformers' semantics
    assert logged(out, "loss")[3] == pytest.approx(logged(reference, "loss")[3], abs=1e-6)


@pytest.mark.parametrize(
    ("cli", "culprit"),
    [
        (("--per_device_train_batch_size", "2"), "per_device_train_batch_size 4 -> 2"),
        (("--gradient_accumulation_steps", "2"), "gradient_accumulation_steps 1 -> 2"),
        (("--seed", "3"), "seed 0 -> 3"),
        (("--train_episodes", "0:4"), "train_episodes ['0:5'] -> ['0:4']"),
    ],
)
def test_resume_that_would_change_the_data_order_is_refused(tmp_path, dataset_root, three_steps, cli, culprit):
    checkpoint = str(three_steps / "checkpoint-2")
    with pytest.raises(RecipeError) as error:
        train(tmp_path, dataset_root, three_steps, "--resume_from_checkpoint", checkpoint, *cli)
    message = one_line(error)
    assert f"{checkpoint!r} was trained with another base, data or batches ({culprit})" in message
    assert "set resume_allow_changes: true" in message


def test_resume_allow_changes_continues_with_a_warning(tmp_path, dataset_root, three_steps, caplog):
    caplog.set_level(logging.WARNING)
    checkpoint = str(three_steps / "checkpoint-2")
    train(tmp_path, dataset_root, three_steps, "--resume_from_checkpoint", checkpoint,
          "--per_device_train_batch_size", "2", "--resume_allow_changes", "true")  # fmt: skip
    assert "per_device_train_batch_size 4 -> 2 (resume_allow_changes): the data order differs" in caplog.text


def test_resume_of_another_model_size_fails_before_the_weights_load(tmp_path, dataset_root, three_steps, monkeypatch):
    bigger = json.loads(json.dumps(DEMOS["openvla"]["model_config"]))
    bigger["text_config"]["hidden_size"] = 128
    monkeypatch.setattr("vla_recipes.pipeline.load_model", lambda *a: pytest.fail("the weights were loaded"))
    with pytest.raises(RecipeError) as error:  # before: a size-mismatch traceback from load_state_dict
        train(tmp_path, dataset_root, three_steps, "--resume_from_checkpoint", "true", model_config=bigger)
    assert "is a checkpoint of another model (model_config {" in one_line(error)


# ---------------------------------------------------------------- run-path tracebacks


def test_lora_targets_matching_nothing_fail_before_anything_is_written(tmp_path, dataset_root):
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as error:  # before: PEFT's traceback, and base_model/ left behind
        train(tmp_path, dataset_root, out, finetune_mode="lora", lora_target_modules=["q_projj"])
    message = one_line(error)
    assert "lora_target_modules=['q_projj'] match no module of this openvla model" in message and "q_proj" in message
    assert not out.exists()
    train(tmp_path, dataset_root, out, finetune_mode="lora", lora_target_modules=["q_proj", "v_proj"])  # not refused


def test_a_failed_start_leaves_no_partial_output(tmp_path, dataset_root, monkeypatch):
    from vla_recipes.families import get_family

    out = tmp_path / "out"

    def no_processor(*args):
        raise RecipeError("the processor cannot be built")

    monkeypatch.setattr(type(get_family("openvla")), "build_processor", no_processor)
    with pytest.raises(RecipeError, match="the processor cannot be built"):
        train(tmp_path, dataset_root, out, finetune_mode="lora")  # fails after base_model/ was written
    assert not out.exists()


def test_an_adapter_of_another_family_is_refused_naming_both(tmp_path, dataset_root):
    from transformers import AutoConfig

    AutoConfig.for_model("pi05").save_pretrained(tmp_path / "pi05-lora")  # what load_config reads of it
    with pytest.raises(RecipeError) as error:  # before: the OpenVLA recipe silently trained pi0.5
        SFT.main(["--config", recipe(tmp_path, dataset_root, tmp_path / "out"), "--model_config", "null",
                  "--model_type", "openvla", "--model_name_or_path", str(tmp_path / "pi05-lora")])  # fmt: skip
    message = one_line(error)
    assert "is a pi05 model (its config.json), but this recipe is for openvla (model_type: openvla)" in message


def test_full_fine_tuning_from_a_lora_folder_trains_the_merged_model(tmp_path, dataset_root):
    lora = train(tmp_path, dataset_root, tmp_path / "lora", finetune_mode="lora")
    out = train(tmp_path, dataset_root, tmp_path / "full", "--model_config", "null",
                "--model_name_or_path", str(lora), finetune_mode="full")  # fmt: skip
    losses = logged(out, "loss")  # before: "element 0 of tensors does not require grad" at the first backward
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    from transformers import AutoModel

    start, end = AutoModel.from_pretrained(lora), AutoModel.from_pretrained(out)
    changed = [n for n, p in end.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any("vision_backbone" in n for n in changed) and any("language_model" in n for n in changed)


# ---------------------------------------------------------------- portable LoRA folders, the published layout


def predict(folder: str | Path, cwd: Path, **kwargs) -> torch.Tensor:
    """``predict_action`` of a saved folder, loaded as a user would from another working directory."""
    import numpy as np
    from transformers import AutoModel, AutoProcessor

    here = Path.cwd()
    os.chdir(cwd)
    try:
        model, processor = AutoModel.from_pretrained(folder, **kwargs).eval(), AutoProcessor.from_pretrained(folder)
    finally:
        os.chdir(here)
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        return model.predict_action(**processor(images=[image], text=["reach the target"]))


def test_a_lora_folder_with_a_random_init_base_loads_after_mv_from_another_cwd(tmp_path, dataset_root):
    out = train(tmp_path, dataset_root, tmp_path / "run" / "out", finetune_mode="lora")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base_model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected = predict(out, tmp_path)
    moved = shutil.move(out, tmp_path / "moved")  # before: OSError: Repo id must be in the form ...
    assert torch.equal(predict(moved, elsewhere), expected)


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` as the Hub cache holds a downloaded snapshot of ``repo_id`` (read offline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = f"{abs(hash(repo_id)):040d}"[:40]
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("checkpoint-*", "_*"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_the_published_openvla_layout_trains_directly_and_its_adapter_loads_from_the_hub(
    tmp_path, dataset_root, monkeypatch
):
    """``model_name_or_path: openvla/openvla-7b`` without conversion (a tiny stand-in in the Hub cache), then the
    pushed adapter loads from the Hub by anyone who has the base."""
    from huggingface_hub import constants

    from vla_recipes.models.openvla import OpenVLAProcessor

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    write_openvla_folder(tmp_path / "published", tiny_7b_layout_state_dict())
    put_in_hub_cache(cache, "openvla/tiny-openvla", tmp_path / "published")
    processor = OpenVLAProcessor.from_pretrained("openvla/tiny-openvla")  # its prismatic processor files, read
    assert processor.image_processor.image_size == 112 and processor.image_processor.means[1] == [0.5, 0.5, 0.5]

    camera = {"camera_keys": ["observation.images.image"], "norm_mode": "bounds_q99", "finetune_mode": "lora"}
    out = train(tmp_path, dataset_root, tmp_path / "out", "--model_config", "null",
                "--model_name_or_path", "openvla/tiny-openvla", "--model_type", "openvla", **camera)  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "openvla/tiny-openvla"
    assert not [f.name for f in out.glob("*.json") if "prismatic" in f.read_text()]  # no remote-code pointer kept
    expected = predict(out, tmp_path)
    put_in_hub_cache(cache, "alice/tiny-openvla-lora", out)
    shutil.rmtree(out)
    assert torch.equal(predict("alice/tiny-openvla-lora", tmp_path), expected)  # with the fine-tune's norm_stats


def test_a_local_base_that_is_gone_is_named_in_one_line(tmp_path, dataset_root):
    from transformers import AutoModel

    from vla_recipes.models.adapters import BaseModelNotFoundError

    base = train(tmp_path, dataset_root, tmp_path / "base", max_steps=1, save_strategy="no")
    out = train(tmp_path, dataset_root, tmp_path / "lora", "--model_config", "null",
                "--model_name_or_path", os.path.relpath(base), finetune_mode="lora")  # fmt: skip
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    expected = predict(out, tmp_path)
    moved = shutil.move(base, tmp_path / "base-moved")
    with pytest.raises(BaseModelNotFoundError) as error:
        AutoModel.from_pretrained(out)
    assert f"the base model {str(base)!r} named in adapter_config.json" in one_line(error)
    assert "base_model_name_or_path=<its folder or Hub id>" in str(error.value)
    assert torch.equal(predict(out, tmp_path, base_model_name_or_path=moved), expected)  # pointed at it
