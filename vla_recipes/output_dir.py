"""A run's hold on its output folder: one run at a time, nothing stale after an overwrite, nothing left by a
failed start.

Two runs into one ``output_dir`` would both pass the "is it empty?" check and write over each other's weights.
:class:`OutputDirLock` is an exclusive ``flock`` on ``<output_dir>/_run.lock``, taken by the main process before
that check and held until the process ends: the kernel drops it when the process dies, SIGKILL included, so a
killed run never leaves it stuck. The file records who holds it (pid, host), for the second run's error.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vla_recipes.configs import RUN_LOCK_NAME, RecipeError, check_output_dir, inside

logger = logging.getLogger(__name__)


class OutputDirLock:
    """``with OutputDirLock(output_dir):`` this process alone writes ``output_dir`` (created when missing).

    The lock file is deleted on release, while still locked: a process that opened it just before then finds,
    once it gets the lock, that the path no longer names its file, and tries again on the new one.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / RUN_LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                if not os.access(self.folder, os.W_OK):
                    raise PermissionError(13, "Permission denied")
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RecipeError(
                    f"output_dir {str(self.folder)!r} cannot be written ({e.strerror or e}); choose a folder you can "
                    "write, or fix its permissions"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RecipeError(
                    f"output_dir {str(self.folder)!r} is in use by another run ({holder}); wait for it to end, or "
                    "choose another output_dir"
                ) from None
            except OSError as e:  # a shared filesystem without flock (some Lustre / NFS mounts): run unguarded
                os.close(fd)
                self.path.unlink(missing_ok=True)
                logger.warning(
                    "output_dir %s cannot be locked (%s): a second run into it would not be refused",
                    self.folder,
                    e.strerror or e,
                )
                return
            if self.path.exists() and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                break
            os.close(fd)  # its holder deleted it on release: lock the file now at that path
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first (what a failed start must not leave)."""
    missing = []
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def previous_content(output_dir: str | os.PathLike) -> list[Path]:
    """What a previous run left in ``output_dir`` (everything but the lock file)."""
    folder = Path(output_dir)
    return sorted(p for p in folder.iterdir() if p.name != RUN_LOCK_NAME) if folder.is_dir() else []


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def clear_for_overwrite(output_dir: str | os.PathLike) -> None:
    """``overwrite_output_dir``: delete the previous run's content, so none of its checkpoints can be resumed
    later as if it were this run's (main process, holding the lock, after every check passed)."""
    stale = previous_content(output_dir)
    if stale:
        names = ", ".join(p.name for p in stale[:6]) + (", ..." if len(stale) > 6 else "")
        logger.warning("overwrite_output_dir: deleting the previous run in %s (%s)", output_dir, names)
        remove(stale)


class OutputDirClaim:
    """What :func:`claim_output_dir` hands the run: whether it may write, and whether training has begun."""

    def __init__(self, args, is_main: bool) -> None:
        self.args, self.is_main = args, is_main
        self.was_empty = not previous_content(args.output_dir)
        self.training_started = False

    def replace_previous_run(self, resume: str | None) -> None:
        """``overwrite_output_dir``: clear the folder, unless this run resumes one of its own checkpoints."""
        if not (self.args.overwrite_output_dir and self.is_main) or self.was_empty:
            return
        if resume is not None and inside(resume, self.args.output_dir):
            logger.warning("overwrite_output_dir is ignored: this run resumes %s, inside output_dir", resume)
            return
        clear_for_overwrite(self.args.output_dir)


@contextmanager
def claim_output_dir(args) -> Iterator[OutputDirClaim]:
    """Lock and check ``output_dir`` on the global main process (one lock per run, whatever the number of
    processes; the others stop with its error). A start that fails before training removes what it wrote into a
    folder that was empty (e.g. a random-init ``base_model/``), so the rerun is not refused."""
    is_main = args.process_index == 0
    lock, error, created = OutputDirLock(args.output_dir), None, missing_ancestors(Path(args.output_dir))
    if is_main:
        try:
            lock.acquire()
            check_output_dir(args)
        except RecipeError as e:
            lock.release()
            error = str(e)
    if args.world_size > 1 and torch.distributed.is_initialized():  # the other processes stop with the main one
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    claim = None if error else OutputDirClaim(args, is_main)
    try:
        if error is not None:
            raise RecipeError(error)
        yield claim
    except BaseException:
        if is_main and (claim is None or (claim.was_empty and not claim.training_started)):
            if claim is not None:
                remove(previous_content(args.output_dir))  # still locked: nobody else's files
            lock.release()
            for folder in created:  # folders this run created, now empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        lock.release()
