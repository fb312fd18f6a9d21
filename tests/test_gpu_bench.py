"""benchmarks/gpu.py, the one-GPU check at the real sizes: its ``--tiny`` CPU run is the same code on the tiny
configs, so the script still works the day a GPU is lent for a few minutes."""

from __future__ import annotations

import json
import sys

import pytest
from cli import ROOT, run

GPU_PY = str(ROOT / "benchmarks" / "gpu.py")
TRAIN_ROWS = {
    (family, mode, ckpt)
    for family, modes in (("pi05", ("full", "expert_only", "lora", "qlora")), ("openvla", ("lora", "qlora")))
    for mode in modes
    for ckpt in (True, False)
}


def test_without_cuda_it_points_to_the_cpu_check(tmp_path):
    result = run([sys.executable, GPU_PY, "--out", str(tmp_path)], timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("runs the CPU check of this script")
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_tiny_run_fills_every_row(tmp_path):
    """Every (family, mode, checkpointing) row trains, LeRobot's step runs beside pi0.5's, both families predict at
    batch 1 and 8, QLoRA's base stays where it was loaded, and the FSDP2 launch trains and saves full weights."""
    # The default 170 s deadline holds on an idle 2-core machine; a busy one must not skip rows here.
    command = [sys.executable, GPU_PY, "--tiny", "--out", str(tmp_path), "--deadline", "560"]
    result = run(command, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())

    assert {(r["family"], r["mode"], r["grad_ckpt"]) for r in report["train"]} == TRAIN_ROWS
    for row in report["train"]:
        assert row["status"] == "ok" and row["s_per_step"] > 0 and row["samples_per_s"] > 0, row
        if row["mode"] == "qlora":
            assert row["param_devices"] == ["cpu"], row
    assert [(r["grad_ckpt"], r["status"]) for r in report["lerobot"]] == [(True, "ok"), (False, "ok")]
    assert {(r["family"], r["batch"]) for r in report["latency"]} == {
        (f, b) for f in ("pi05", "openvla") for b in (1, 8)
    }
    assert all(r["status"] == "ok" and r["ms_per_chunk"] > 0 for r in report["latency"])
    [fsdp] = report["fsdp"]
    assert fsdp["status"] == "ok" and len(fsdp["losses"]) == 3 and fsdp["saved"], fsdp

    table = (tmp_path / "gpu.md").read_text()
    assert "| OpenVLA tiny | qlora | off | 2 |" in table
    assert table.count("x** (") == 2  # the pi0.5 step ratio to LeRobot's, with and without checkpointing
