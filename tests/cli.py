"""Run a command as a user would, with a hard time limit that kills the whole process tree.

Every subprocess a test starts goes through :func:`run`: a hung run (a stuck rank, a deadlocked
exit) must fail the test, never the CI job.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


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


def run(command: list[str], *, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT):
    """``subprocess.run(capture_output=True, text=True)`` that kills the tree on timeout and says so."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(command)}\n--- stdout ---\n{stdout[-4000:]}"
            f"\n--- stderr ---\n{stderr[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def accelerate_launch(script: str, *args: str, config: str = "single_gpu.yaml", **kwargs):
    """``accelerate launch --config_file accelerate_configs/<config> <script> <args>``."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
    ]
    return run([*launcher, str(ROOT / script), *args], **kwargs)
