"""Work a multi-process run does once, on the main process, instead of once per rank.

Dataset checks, statistics, Hub checks, the frame cache and a random-init base are the same on every rank: at 64
ranks, running them everywhere means 64 readers of every parquet and video file, 64 ``whoami`` calls to the Hub
(rate-limited) and 64 writers of one folder. Both helpers use accelerate's ``PartialState`` (what ``accelerate
launch`` and ``TrainingArguments`` set up) and do nothing extra in a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from vla_recipes.configs import RecipeError


class MainProcessError(RuntimeError):
    """The main process failed in work done for every rank; the other ranks raise this instead of waiting."""


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block, then the others do (reading what it wrote, e.g. a cache entry).

    ``PartialState.main_process_first`` skips its closing barrier when the main process raises, which leaves the
    other ranks waiting until the collective times out; here they go on and meet the same error themselves.
    """
    state = PartialState()
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_main_process:
            state.wait_for_everyone()


def on_main_process[T](fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` computed by the main process alone and sent to every rank (it must pickle).

    Every rank calls this at the same point. A ``RecipeError`` of the main process is raised on every rank with
    the same message; any other error is raised there and as :class:`MainProcessError` on the others.
    """
    state = PartialState()
    if state.num_processes == 1:
        return fn(*args, **kwargs)
    message: list = [None, None, None]  # result, RecipeError message, other error
    error: BaseException | None = None
    if state.is_main_process:
        try:
            message[0] = fn(*args, **kwargs)
        except RecipeError as e:
            error, message[1] = e, str(e)
        except Exception as e:
            error, message[2] = e, f"{type(e).__name__}: {e}"
    broadcast_object_list(message, from_process=0)
    if error is not None:
        raise error
    if message[1] is not None:
        raise RecipeError(message[1])
    if message[2] is not None:
        raise MainProcessError(f"the main process failed ({message[2]}); its log has the traceback")
    return message[0]
