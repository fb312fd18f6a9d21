"""Distributed runs: what the trainers need around accelerate's strategies (DDP, FSDP2, DeepSpeed).

Nothing here launches processes or wraps models by hand; accelerate does that. This module holds
the few things a recipe must do itself, such as closing a multi-process run cleanly.
"""

from __future__ import annotations

import gc

from transformers import Trainer


def end_training(trainer: Trainer) -> None:
    """Close a (possibly multi-process) run so that every process exits.

    Gloo's worker threads free finished collectives on their own thread, which needs the GIL when
    the collective holds Python-owned tensors. If the process group dies inside DDP's C++ reducer
    (which joins those threads while holding the GIL) or only at interpreter exit, a 2-process run
    can hang at the end or abort with "terminate called without an active exception". Dropping the
    DDP/FSDP wrapper first and destroying the group through accelerate lets the threads finish
    while the GIL is free.
    """
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    accelerator.end_training()
