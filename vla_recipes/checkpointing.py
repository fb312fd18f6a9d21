"""Atomic checkpoints: a checkpoint counts only once its completion mark is written, last.

A run killed while saving (preemption, OOM killer) leaves a ``checkpoint-<step>`` folder with some
of its files. transformers' ``get_last_checkpoint`` would pick that folder and then fail to load
it, and ``save_total_limit`` could keep it instead of a complete one. ``VLATrainer`` writes
:data:`COMPLETE_MARK` after every process has written its files; resuming picks the newest marked
folder, and unmarked ones are deleted before the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from vla_recipes.configs import RecipeError

COMPLETE_MARK = "checkpoint_complete.json"


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
