"""Atomic checkpoints: a checkpoint counts only once its completion mark is written, last.

A run killed while saving (preemption, OOM killer) leaves a ``checkpoint-<step>`` folder with some
of its files. transformers' ``get_last_checkpoint`` would pick that folder and then fail to load
it, and ``save_total_limit`` could keep it instead of a complete one. ``VLATrainer`` writes
:data:`COMPLETE_MARK` after every process has written its files; resuming picks the newest marked
folder, and unmarked ones are deleted before the next save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from vla_recipes.configs import RecipeError, parse_episodes

COMPLETE_MARK = "checkpoint_complete.json"
logger = logging.getLogger(__name__)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / COMPLETE_MARK).is_file()


def mark_complete(checkpoint: str | os.PathLike, global_step: int) -> None:
    """Write the mark atomically (temp file + rename): a kill leaves either no mark or a whole one."""
    checkpoint = Path(checkpoint)
    tmp = checkpoint / f".{COMPLETE_MARK}.tmp"
    tmp.write_text(json.dumps({"global_step": global_step, "time": time.time()}))
    os.replace(tmp, checkpoint / COMPLETE_MARK)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>`` folder, oldest first by step number (``checkpoint-10`` after ``-9``)."""
    if not Path(output_dir).is_dir():
        return []
    return [Path(path) for path in sort_checkpoints(str(output_dir))]


def incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    return [path for path in checkpoints(output_dir) if not is_complete(path)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    complete = [path for path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoints, so that ``save_total_limit`` only ever counts complete ones."""
    removed = incomplete_checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint`` as a checkpoint folder to load, or None (start afresh).

    ``true`` means the newest complete checkpoint in ``output_dir``; a path must be a complete
    checkpoint. Either way the error names what was found and what to do.
    """
    if not value:
        return None
    if value is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            partial = [path.name for path in incomplete_checkpoints(output_dir)]
            found = f"only incomplete ones {partial} (killed while saving)" if partial else "none"
            raise RecipeError(
                f"resume_from_checkpoint: true, but output_dir {str(output_dir)!r} holds no complete checkpoint "
                f"({found}); drop resume_from_checkpoint to start afresh or give a checkpoint folder"
            )
        return str(checkpoint)
    path = Path(value)
    if not path.is_dir():
        raise RecipeError(f"resume_from_checkpoint: {value!r} is not a folder")
    if not is_complete(path):
        newest = last_complete_checkpoint(path.parent)
        hint = f"resume from {str(newest)!r} (the newest complete one)" if newest else "start afresh"
        raise RecipeError(
            f"resume_from_checkpoint: {value!r} is not a complete checkpoint (no {COMPLETE_MARK}: the run was killed "
            f"while saving it, or it was not written by vla-recipes); {hint}"
        )
    return str(path)


# ---------------------------------------------------------------- what a resume restores, and what it cannot

RECIPE_NAME = "recipe.json"  # the run's recipe, written into every checkpoint so that a resume can compare
# Recipe keys whose change makes the checkpoint another model: its weights would not load (or load wrongly).
MODEL_KEYS = ("model_type", "model_config", "finetune_mode", "lora_r", "lora_alpha", "lora_target_modules")
# Keys whose change alters the run: another base (or the same one moved: hence allowed on request), or other
# samples at each step, so that the resumed run can no longer equal an uninterrupted one.
EXACTNESS_KEYS = (
    "model_name_or_path", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed",
    "data_seed", "dataset_repo_id", "train_episodes", "tasks", "camera_keys", "action_horizon", "image_augmentation",
    "relative_actions", "relative_action_mask", "datasets",
)  # fmt: skip
# Keys a resume accepts as transformers does, but whose effect is not what the new value suggests: warned.
SCHEDULE_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_steps",
    "num_train_epochs", "eval_episodes",
)  # fmt: skip


def run_recipe(model_args, data_args, training_args, model_type: str) -> dict:
    """The flat recipe a checkpoint and the output folder record (``recipe.json``): every argument of the three
    groups (model, data, training; no two share a name), the model's family and the number of processes."""
    return {
        **training_args.to_dict(),
        **vars(model_args),
        **vars(data_args),
        "model_type": model_type,
        "world_size": training_args.world_size,
    }


def write_recipe(checkpoint: str | os.PathLike, recipe: dict) -> None:
    (Path(checkpoint) / RECIPE_NAME).write_text(json.dumps(recipe, indent=2, default=str))


def checkpoint_step(checkpoint: str | os.PathLike) -> int | None:
    """The global step a complete checkpoint was written at (from its completion mark)."""
    mark = Path(checkpoint) / COMPLETE_MARK
    return json.loads(mark.read_text()).get("global_step") if mark.is_file() else None


def check_optimizer_state(checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint without its optimizer or LR scheduler state: transformers would silently start AdamW's
    moments and the LR schedule afresh at the checkpoint's step (FSDP and DeepSpeed keep theirs in folders)."""
    folder = Path(checkpoint)
    sharded = any(folder.glob("optimizer_*")) or any(folder.glob("global_step*"))
    missing = [
        name
        for name, present in (
            ("optimizer.pt", sharded or (folder / "optimizer.pt").is_file() or (folder / "optimizer.bin").is_file()),
            ("scheduler.pt", any(folder.glob("global_step*")) or (folder / "scheduler.pt").is_file()),
        )
        if not present
    ]
    if missing:
        raise RecipeError(
            f"resume_from_checkpoint: {str(folder)!r} has no {' or '.join(missing)}: resuming would restart the "
            "optimizer and the LR schedule from scratch; resume from a checkpoint that has them, or start a new run "
            "from its weights (model_name_or_path) without resume_from_checkpoint"
        )


def _same(key: str, old, new) -> bool:
    if key in ("train_episodes", "eval_episodes"):
        old, new = parse_episodes(old), parse_episodes(new)
    return json.dumps(old, default=str, sort_keys=True) == json.dumps(new, default=str, sort_keys=True)


def _changes(recorded: dict, recipe: dict, keys: tuple[str, ...]) -> list[str]:
    return [
        f"{key} {recorded[key]!r} -> {recipe[key]!r}"
        for key in keys
        if key in recorded and key in recipe and not _same(key, recorded[key], recipe[key])
    ]


def check_resume_recipe(checkpoint: str | os.PathLike, recipe: dict) -> None:
    """Compare this run's recipe with the one the checkpoint recorded, before any weight is loaded.

    Another model (family, sizes, fine-tuning mode): refused, its weights do not fit (or fit wrongly). Another
    base path, batch geometry, process count, seed or training data: refused unless ``resume_allow_changes``,
    because the restored data position then points at other samples. Learning rate, schedule, max_steps/epochs,
    eval episodes: transformers' semantics are kept (the optimizer and scheduler states are restored, so the old
    learning rate goes on; a new max_steps stretches the schedule) and a warning says so.
    """
    path = Path(checkpoint) / RECIPE_NAME
    if not path.is_file():
        logger.warning("%s has no %s (older version): changes to the recipe are not checked", checkpoint, RECIPE_NAME)
        return
    recorded = json.loads(path.read_text())
    where = f"resume_from_checkpoint: {str(checkpoint)!r}"
    if changed := _changes(recorded, recipe, MODEL_KEYS):
        raise RecipeError(
            f"{where} is a checkpoint of another model ({'; '.join(changed)}); resume it with the recipe that wrote "
            "it, or drop resume_from_checkpoint to start a new run"
        )
    if changed := _changes(recorded, recipe, EXACTNESS_KEYS):
        if not recipe.get("resume_allow_changes"):
            raise RecipeError(
                f"{where} was trained with another base, data or batches ({'; '.join(changed)}): the resumed run "
                "would not continue it exactly; resume with the checkpoint's values, or set resume_allow_changes: "
                "true to continue anyway"
            )
        logger.warning(
            "%s: resuming with %s (resume_allow_changes): the data order differs from an uninterrupted run",
            where,
            "; ".join(changed),
        )
    if changed := _changes(recorded, recipe, SCHEDULE_KEYS):
        logger.warning(
            "%s: %s; the checkpoint's optimizer and LR scheduler are restored (transformers' resume), so the learning "
            "rate continues the checkpoint's schedule and a new max_steps/epochs changes only its length; to train "
            "with new values from these weights, start a new run from them without resume_from_checkpoint",
            where,
            "; ".join(changed),
        )
