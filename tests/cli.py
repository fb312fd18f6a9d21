"""Run a command as a user would, with a hard time limit that kills the whole process tree.

Every subprocess a test starts goes through :func:`run`: a hung run (a stuck rank, a deadlocked
exit) must fail the test, never the CI job.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import psutil
import yaml

from vla_recipes.families import package_families

ROOT = Path(__file__).resolve().parents[1]
# Every family of the package has its tiny demo recipe, recipes/demo/<model_type>.yaml (test_family_contract checks).
DEMOS = {name: yaml.safe_load((ROOT / f"recipes/demo/{name}.yaml").read_text()) for name in package_families()}


def load_script(name: str) -> ModuleType:
    """``recipes/<name>.py`` imported as a module, so a test can call its ``main(args)`` in-process."""
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torch's elastic agent puts ranks in their own sessions)."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def run(
    command: list[str],
    *,
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path = ROOT,
    until: Callable[[], bool] | None = None,
):
    """``subprocess.run(capture_output=True, text=True)`` that kills the tree on timeout and says so.

    ``until``: polled while the command runs; once it returns true the whole tree is SIGKILLed (a preemption)
    and the result has returncode -9. The command then runs at ``nice 10``: on two busy cores a poller at the
    same priority as the training processes can sleep through the whole window it watches for.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    if until is not None:
        command = ["nice", "-n", "10", *command]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + timeout, False
    while True:
        try:  # a retried communicate() loses no output
            stdout, stderr = proc.communicate(timeout=0.02 if until else timeout)
            break
        except subprocess.TimeoutExpired:
            if until is not None and until():
                kill_tree(proc.pid)  # reaps it: proc.returncode would read 0
                stdout, stderr = proc.communicate(timeout=30)
                killed = True
                break
            if time.monotonic() < deadline:
                continue
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(command)}\n--- stdout ---\n{stdout[-4000:]}"
            f"\n--- stderr ---\n{stderr[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(command, -9 if killed else proc.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port nobody listens on: concurrent 2-process runs must not share accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    script: str, *args: str, config: str = "single_gpu.yaml", num_processes: int | None = None, **kwargs
):
    """``accelerate launch --config_file accelerate_configs/<config> <script> <args>`` on a free port;
    ``num_processes`` overrides the config's (an 8-GPU config on the one GPU at hand)."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
    ]
    launcher += ["--main_process_port", str(free_port())]
    if num_processes is not None:
        launcher += ["--num_processes", str(num_processes)]
    if config == "multi_cpu.yaml":  # accelerate's multi-process launcher does not pass the config's use_cpu on
        kwargs["env"] = {"ACCELERATE_USE_CPU": "1", **kwargs.get("env", {})}
    return run([*launcher, str(ROOT / script), *args], **kwargs)


@contextlib.contextmanager
def started(command: list[str], log: Path, *, env: dict | None = None, cwd: Path = ROOT):
    """A long-running command (a server) for the duration of a ``with`` block, stdout and stderr to ``log``.

    Yields the ``Popen``; the block may stop it itself (a signal); whatever happens, its whole tree is SIGKILLed
    on the way out if it is still running.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait(timeout=30)
