"""Work a multi-process run does once, on the main process, instead of once per rank.

Dataset checks, statistics, Hub checks, the frame cache and a random-init base are the same on every rank: at 64
ranks, running them everywhere means 64 readers of every parquet and video file, 64 ``whoami`` calls to the Hub
(rate-limited) and 64 writers of one folder. Both helpers follow accelerate's ``PartialState`` (what ``accelerate
launch`` and ``TrainingArguments`` set up) and do nothing extra in a single process.

The other ranks wait for the main process in a gloo group of their own, without the training group's timeout
(``ddp_timeout``, 30 minutes by default): a first frame-cache build of a large dataset can take longer than that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
from accelerate import PartialState

from vla_recipes.configs import RecipeError

WAIT_TIMEOUT = timedelta(days=2)  # how long the other ranks wait for the main process's work


class MainProcessError(RuntimeError):
    """The main process failed in work done for every rank; the other ranks raise this instead of waiting."""


@functools.cache
def _waiting_group() -> dist.ProcessGroup:
    """Created on first use, by every rank at the same point (each rank calls the helpers below in the same order)."""
    return dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def _distributed() -> bool:
    return PartialState().num_processes > 1 and dist.is_initialized()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block, then the others do (reading what it wrote, e.g. a cache entry).

    Unlike ``PartialState.main_process_first``, the closing barrier is also reached when the main process raises
    (the others then meet the same error themselves instead of waiting), and the wait has no training timeout.
    """
    main, distributed = PartialState().is_main_process, _distributed()
    if distributed and not main:
        dist.barrier(group=_waiting_group())
    try:
        yield
    finally:
        if distributed and main:
            dist.barrier(group=_waiting_group())


def on_main_process[T](fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` computed by the main process alone and sent to every rank (it must pickle).

    Every rank calls this at the same point. A ``RecipeError`` of the main process is raised on every rank with
    the same message; any other error is raised there and as :class:`MainProcessError` on the others.
    """
    if not _distributed():
        return fn(*args, **kwargs)
    message: list = [None, None, None]  # result, RecipeError message, other error
    error: BaseException | None = None
    if PartialState().is_main_process:
        try:
            message[0] = fn(*args, **kwargs)
        except RecipeError as e:
            error, message[1] = e, str(e)
        except Exception as e:
            error, message[2] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(message, src=0, group=_waiting_group())
    if error is not None:
        raise error
    if message[1] is not None:
        raise RecipeError(message[1])
    if message[2] is not None:
        raise MainProcessError(f"the main process failed ({message[2]}); its log has the traceback")
    return message[0]
