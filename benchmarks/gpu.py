"""The one-GPU check at the real sizes: memory, step time and latency of OpenVLA-7B and pi0.5 base, random init.

For each family and each mode that fits one GPU (OpenVLA-7B: LoRA, QLoRA; pi0.5 base: full, expert_only, LoRA,
QLoRA), with gradient checkpointing on and off, the model is built the way ``recipes/sft.py`` builds it from the
family's own recipe (``recipes/openvla/libero_spatial/*.yaml``, ``recipes/pi05/libero/*.yaml``: dtype, LoRA rank,
bf16, optimizer, batch), then trained ``--steps`` optimizer steps (after one warm-up step) by the family's trainer
on synthetic samples. Rows: peak memory (``torch.cuda.max_memory_allocated``), s/step and samples/s. Next to them:

- LeRobot's own ``PI05Policy`` at the same size and batch, trained by ``lerobot-train``'s loop body
  (``benchmarks/train_step.py``'s ``LeRobotLoop``) with the same gradient checkpointing: the step ratio;
- batch-1 and batch-8 ``predict_action`` latency of each family (bf16 weights, ms per call = per action chunk);
- the QLoRA ``device_map`` (where the 4-bit base was loaded);
- a 1-process FSDP2 run of the tiny demo recipes through
  ``accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/sft.py``.

Random weights come from the config (no download): each family's base is initialised once directly on the device in
bfloat16 and saved, as ``load_model`` saves a random base for adapters; every mode then loads it through
``from_pretrained`` as it would load openvla/openvla-7b or lerobot/pi05_base. A mode that runs out of memory gives an
OOM row, a mode this machine cannot run an "unsupported" row, and the script goes on; rows that would start past the
soft deadline are skipped, and a watchdog ends the process at ``--deadline`` seconds whatever happens. The JSON and
Markdown tables are rewritten after every row, so a stopped run still leaves what it measured.

The prompts go through the local character tokenizers (no gated download): pi0.5 pads them to its 200 tokens as
PaliGemma's would; OpenVLA's ~80-character prompt is ~80 tokens where Llama's makes ~25, so its sequences (256 patches
+ prompt) are ~15% longer than with the real tokenizer, and its figures err on the high side.

``--tiny`` runs the same code on the CPU with the tests' tiny configs, float32 and batch 2 (tests/test_gpu_bench.py),
so the script cannot rot while no GPU is at hand; its timings mean nothing.

    python benchmarks/gpu.py [--out outputs/gpu] [--steps 3] [--deadline 450]   # one CUDA device (make bench-gpu)
    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny                            # CPU check, < 3 minutes
"""

from __future__ import annotations

import os

# Collation runs on the CPU: half the cores (8 of a 16-core GPU machine, 1 of a busy 2-core one), at most 8.
os.environ.setdefault("BENCH_THREADS", str(max(1, min(8, (os.cpu_count() or 2) // 2))))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from _common import (  # noqa: E402
    CAMERAS,
    REPO_ID,
    ROOT,
    Data,
    build_model,
    configured_config,
    seen_by,
    synthetic_data,
    tiny_config,
)

sys.path.insert(0, str(ROOT / "tests"))  # tests/cli.py (process-tree timeouts), tests/lerobot_pi05_reference.py

# Recipes per family, in the order they run (the pi0.5 full recipe is also the one compared with LeRobot's step).
RECIPES = {
    "pi05": ["pi05/libero/full", "pi05/libero/expert_only", "pi05/libero/lora", "pi05/libero/qlora"],
    "openvla": ["openvla/libero_spatial/lora", "openvla/libero_spatial/qlora"],
}
NAMES = {"pi05": "pi0.5 base", "openvla": "OpenVLA-7B"}
TINY_NAMES = {"pi05": "pi0.5 tiny", "openvla": "OpenVLA tiny"}
# Peak-memory goals (GB) at the recipes' batch: openpi's published needs for pi0.5, OpenVLA's for its LoRA (~72 GB).
GOALS_GB = {("openvla", "lora"): 50.0, ("openvla", "qlora"): 24.0, ("pi05", "lora"): 22.5, ("pi05", "full"): 70.0}
LATENCY_BATCHES = (1, 8)
TINY_BATCH = 2
# Seconds left under which a row is not started (its model load and steps would overrun the deadline).
ROW_RESERVE_S = {
    "cuda": {"openvla": 75.0, "pi05": 45.0, "lerobot": 60.0},
    "cpu": {"openvla": 10, "pi05": 10, "lerobot": 20},
}
FSDP_TIMEOUT_S = {"cuda": 150, "cpu": 240}
FSDP_DEMOS = {"cuda": ("openvla", "pi05"), "cpu": ("openvla",)}  # one on the CPU: a launch there takes ~2 minutes


@dataclass
class Device:
    """The one place where the CUDA run and the ``--tiny`` CPU run differ (besides sizes): where the weights go, how a
    step is timed (wall time after a synchronise), and what memory is read (the CUDA allocator's peak; none on CPU)."""

    type: str

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def bf16(self) -> bool:
        """bf16 weights and autocast on the GPU, as the recipes train; float32 on the CPU, where bf16 is slow."""
        return self.cuda

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def name(self) -> str:
        if not self.cuda:
            return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
        return f"{torch.cuda.get_device_name()} ({memory:.0f} GB, CUDA {torch.version.cuda})"

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def allocated_gb(self) -> float | None:
        return torch.cuda.memory_allocated() / 1e9 if self.cuda else None

    def release(self) -> None:
        """Give back what the last row left (its exception's frames included) before the next row measures."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class Report:
    """Rows by table, written as JSON and Markdown after every row (a run stopped midway keeps its rows)."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.header, self.start = out, header, time.perf_counter()
        self.tables: dict[str, list[dict]] = {"train": [], "lerobot": [], "latency": [], "fsdp": []}
        self.lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, table: str, row: dict) -> None:
        with self.lock:
            self.tables[table].append(row)
            print(f"[{table}] " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "step_s"), flush=True)
            self.write()

    def errors(self) -> list[dict]:
        return [row for rows in self.tables.values() for row in rows if row["status"].startswith("error")]

    def write(self) -> None:
        self.header["wall_s"] = round(time.perf_counter() - self.start, 1)
        data = {"header": self.header, **self.tables}
        (self.out / "gpu.json").write_text(json.dumps(data, indent=2, default=str))
        (self.out / "gpu.md").write_text(markdown(data))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]


def markdown(data: dict) -> str:
    """The tables a reader pastes into README / RESULTS.md."""
    h = data["header"]
    names = TINY_NAMES if h["tiny"] else NAMES
    title = "CPU check (--tiny: tiny configs, float32; timings meaningless)" if h["tiny"] else "One GPU, real sizes"
    lines = [
        f"### {title}: {h['device']}, {h['date']}",
        "",
        f"{h['versions']}. Per row: {h['steps']} timed optimizer step(s) after 1 warm-up, at the recipe's batch, on "
        "synthetic samples (2 cameras at 224 px, chunk 50 for pi0.5); peak = torch.cuda.max_memory_allocated "
        f"(GB = 1e9 bytes); s/step is wall time, collation included. Whole run: {h['wall_s']} s.",
        "",
    ]
    train = {(r["family"], r["mode"], r["grad_ckpt"]): r for r in data["train"]}
    rows = []
    for r in data["train"]:
        goal = GOALS_GB.get((r["family"], r["mode"]))
        met = None if goal is None or r["peak_gb"] is None else ("met" if r["peak_gb"] <= goal else "not met")
        goal_text = "-" if goal is None else f"<= {goal:g}" + (f" ({met})" if met else "")
        rows.append([
            names[r["family"]], r["mode"], "on" if r["grad_ckpt"] else "off", r["batch"], r["peak_gb"],
            r["s_per_step"], r["samples_per_s"], goal_text, r.get("wall_s"), r["status"],
        ])  # fmt: skip
    header = [
        "model",
        "mode",
        "grad ckpt",
        "batch",
        "peak GB",
        "s/step",
        "samples/s",
        "goal GB",
        "row wall s",
        "status",
    ]
    lines += table(header, rows)
    if data["lerobot"]:
        rows = []
        for r in data["lerobot"]:
            ours = train.get(("pi05", "full", r["grad_ckpt"]), {}).get("s_per_step")
            ratio = ours / r["s_per_step"] if ours and r["s_per_step"] else None
            verdict = None if ratio is None else ("met" if ratio <= 1.0 else "not met")
            rows.append([
                "on" if r["grad_ckpt"] else "off", r["batch"], r["peak_gb"], r["s_per_step"], ours,
                f"**{ratio:.2f}x** ({verdict})" if ratio else "-", r["status"],
            ])  # fmt: skip
        lines += ["", f"{names['pi05']} full fine-tuning, ours vs LeRobot's PI05Policy (lerobot-train's step):", ""]
        lines += table(
            ["grad ckpt", "batch", "LeRobot peak GB", "LeRobot s/step", "ours s/step", "ratio (goal <= 1.0)", "status"],
            rows,
        )
    if data["latency"]:
        rows = [[names[r["family"]], r["batch"], r["ms_per_chunk"], r["status"]] for r in data["latency"]]
        lines += ["", f"predict_action latency ({h['dtype']} weights, median of the timed calls):", ""]
        lines += table(["model", "batch", "ms per chunk", "status"], rows)
    device_maps = {r["family"]: r for r in data["train"] if r.get("device_map") is not None}
    if device_maps:
        lines += ["", "QLoRA: where the 4-bit base was loaded (`hf_device_map`) and the devices of all parameters:", ""]
        lines += [
            f"- {names[f]}: `{r['device_map']}`, parameters on {r['param_devices']}" for f, r in device_maps.items()
        ]
    if data["fsdp"]:
        rows = [[r["recipe"], r["losses"], r["saved"], r["wall_s"], r["status"]] for r in data["fsdp"]]
        lines += [
            "",
            "1-process FSDP2: `accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/sft.py`:",
            "",
        ]
        lines += table(["recipe", "losses", "full weights saved", "wall s", "status"], rows)
    return "\n".join(lines) + "\n"


class Deadline:
    """The soft deadline (rows that would start too late are skipped) and the hard one (a watchdog ends the process,
    children included, after writing what was measured)."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.end = time.monotonic() + seconds
        self.report = report
        timer = threading.Timer(seconds, self.expire)
        timer.daemon = True
        timer.start()

    def left(self) -> float:
        return self.end - time.monotonic()

    def expire(self) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with self.report.lock:
            self.report.write()
        print(f"hard deadline: stopped after {self.report.header['wall_s']} s; rows so far in {self.report.out}")
        sys.stdout.flush()
        os._exit(3)


def guarded(fn: Callable[[], dict], device: Device, deadline: Deadline, reserve: float) -> tuple[str, dict]:
    """(status, figures) of one row: OOM and unsupported modes become rows, and so does any other failure (its
    traceback printed), so one broken row does not cost the rest of a lent GPU's minutes."""
    from vla_recipes.configs import RecipeError

    if deadline.left() < reserve:
        return "skipped: deadline", {}
    status, figures, start = "ok", {}, time.perf_counter()
    try:
        figures = fn()
    except torch.OutOfMemoryError:
        status = "OOM"
    except RecipeError as e:
        status = f"unsupported: {e}"
    except Exception as e:
        traceback.print_exc()
        status = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    device.release()  # after the except block, so the exception's frames (and the model they hold) are gone
    return status, figures | {"wall_s": round(time.perf_counter() - start, 1)}


def timing(step_s: list[float], batch: int) -> dict:
    median = statistics.median(step_s)
    return {"s_per_step": median, "samples_per_s": batch / median, "step_s": step_s}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def write_base(model_type: str, data: Data, folder: Path, device: Device, tiny: bool) -> Path:
    """A random model of the real size (``tiny``: the tests' tiny size) saved with its processor, as ``load_model``
    saves the base of an adapter run, but initialised on the device in bfloat16 (a 7B init on the CPU takes minutes)."""
    from vla_recipes.configs import ModelArguments

    model_args = ModelArguments(model_config=tiny_config(model_type) if tiny else {"model_type": model_type})
    config, family = configured_config(model_args, data)
    torch.manual_seed(0)
    with torch.device(device.type), default_dtype(device.dtype):
        model = family.model_class(config)
    model.save_pretrained(folder)
    family.new_processor(config, None).save_pretrained(folder)
    return folder


def recipe_args(recipe: str, base: Path, data: Data, out: Path, device: Device, batch: int, steps: int, ckpt: bool):
    """The family's recipe YAML on the random base and the synthetic data, ``steps`` + 1 steps, nothing saved."""
    from vla_recipes.configs import parse_recipe

    fields = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    fields |= {
        "model_name_or_path": str(base),
        "dataset_repo_id": REPO_ID,
        "dataset_root": str(data.root),
        "train_episodes": None,
        "eval_episodes": None,
        "output_dir": str(out),
        "gradient_checkpointing": ckpt,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "max_steps": steps + 1,
        "warmup_steps": 0,
        "logging_steps": 10_000,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        **({} if device.bf16 else {"dtype": "float32", "bf16": False}),
        **({} if device.cuda else {"use_cpu": True}),
    }
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields))
    return parse_recipe(["--config", str(path)])


def train_row(recipe: str, base: Path, data: Data, folder: Path, device: Device, batch: int, steps: int, ckpt: bool):
    """Peak memory and step time of one recipe, built and trained as recipes/sft.py does it."""
    from train_step import StepClock, intervals

    model_type = recipe.split("/")[0]
    model_args, _, args = recipe_args(recipe, base, data, folder / "run", device, batch, steps, ckpt)
    model, processor, family = build_model(
        model_type, data, folder / "run", model_args=model_args, gradient_checkpointing=ckpt
    )
    trainer = family.make_trainer(
        model=model,
        args=args,
        processor=processor,
        train_dataset=seen_by(model.config, data.samples[:batch]),
        eval_dataset=None,
    )
    figures: dict[str, Any] = {"loaded_gb": device.allocated_gb()}
    if model_args.finetune_mode == "qlora":
        figures["device_map"] = getattr(model.get_base_model(), "hf_device_map", "none (CPU)")
        figures["param_devices"] = sorted({str(p.device) for p in model.parameters()})
    clock = StepClock(device.clock)
    trainer.add_callback(clock)
    device.reset_peak()
    trainer.train()
    figures |= {"peak_gb": device.peak_gb(), **timing(intervals(clock.marks), batch)}
    trainer.accelerator.free_memory()
    return figures


def lerobot_row(data: Data, folder: Path, device: Device, batch: int, steps: int, ckpt: bool, tiny: bool) -> dict:
    """LeRobot's PI05Policy (bf16, as lerobot-train's ``--policy.dtype=bfloat16``) trained by lerobot-train's loop
    body under bf16 autocast, as ours trains; built on the device at the real size, or LeRobot's patched tiny size."""
    import pytest
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors
    from lerobot_pi05_reference import Reference, patch_lerobot_tiny, patch_tokenizer
    from train_step import LeRobotLoop

    from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
    from vla_recipes.models.pi05 import TINY_PI05_CONFIG, Pi05Config

    tokenizer_dir = folder / "tokenizer"
    build_gemma_like_tokenizer().save_pretrained(tokenizer_dir)
    size = TINY_PI05_CONFIG["image_size"] if tiny else Pi05Config().image_size
    features = {key: PolicyFeature(FeatureType.VISUAL, (3, size, size)) for key in CAMERAS}
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (8,))
    config = PI05Config(
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))},
        chunk_size=data.horizon,
        n_action_steps=data.horizon,
        image_resolution=(size, size),
        dtype="bfloat16" if device.bf16 else "float32",
        gradient_checkpointing=ckpt,
        device=device.type,
    )
    stats = {
        key: {name: torch.as_tensor(value) for name, value in data.meta.stats[key].items()}
        for key in ("observation.state", "action")
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_lerobot_tiny(monkeypatch, "pi05", tokenizer_dir) if tiny else patch_tokenizer(monkeypatch, tokenizer_dir)
        with torch.device(device.type):
            policy = PI05Policy(config)
        preprocessor, postprocessor = make_pi05_pre_post_processors(config, stats)
    policy.train()
    reference = Reference(policy, preprocessor, postprocessor, folder)
    loop = LeRobotLoop(
        reference, data.samples[:batch], batch, total_steps=30_000, cpu=not device.cuda,
        mixed_precision="bf16" if device.bf16 else "no",
        clock=device.clock,
    )  # fmt: skip
    device.reset_peak()
    step_s = loop.block(steps)
    figures = {"peak_gb": device.peak_gb(), **timing(step_s, batch)}
    loop.accelerator.free_memory()
    return figures


def latency_rows(recipe: str, base: Path, data: Data, folder: Path, device: Device, repeats: int) -> dict:
    """ms per ``predict_action`` call at each of LATENCY_BATCHES, on the bf16 model as a deployment loads it."""
    from vla_recipes.data.collators import observations

    model_type = recipe.split("/")[0]
    model_args, _, _ = recipe_args(recipe, base, data, folder / "latency", device, 1, 0, False)
    model_args.finetune_mode = "full"  # the plain model, as a fine-tuned (or merged) checkpoint loads
    model, processor, family = build_model(model_type, data, folder / "latency", model_args=model_args)
    model.to(device.type).eval()
    figures = {}
    for batch in LATENCY_BATCHES:
        inputs = processor(**observations(seen_by(model.config, data.samples[:batch]))).to(device.type)
        with torch.inference_mode():
            model.predict_action(**inputs)  # warm-up: kernels, allocator
            times = []
            for _ in range(repeats):
                start = device.clock()
                model.predict_action(**inputs)
                times.append(device.clock() - start)
        figures[batch] = 1000 * statistics.median(times)
    return figures


def fsdp_rows(demos: tuple[str, ...], root: Path, folder: Path, device: Device, report: Report) -> None:
    """The tiny demo recipes under accelerate_configs/fsdp.yaml with one process: FSDP2 wrapping, sharded
    training and the full-weights save of recipes/sft.py on this device."""
    from cli import DEMOS, accelerate_launch

    for demo in demos:
        out = folder / f"fsdp-{demo}"
        recipe = {
            **DEMOS[demo],
            "dataset_root": str(root),
            "train_episodes": None,
            "eval_episodes": None,
            "eval_strategy": "no",
            "output_dir": str(out),
            "max_steps": 3,
            "logging_steps": 1,
            "warmup_steps": 0,
            "per_device_train_batch_size": 4,
            "dataloader_num_workers": 0,
            "bf16": device.bf16,
            **({} if device.cuda else {"use_cpu": True}),
        }
        path = folder / f"fsdp-{demo}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env = {} if device.cuda else {"ACCELERATE_USE_CPU": "1"}
        start, row = time.perf_counter(), {"recipe": f"demo/{demo} (tiny){', bf16' * device.bf16}, 3 steps"}
        try:
            result = accelerate_launch(
                "recipes/sft.py", "--config", str(path), config="fsdp.yaml", num_processes=1, env=env,
                timeout=FSDP_TIMEOUT_S[device.type],
            )  # fmt: skip
            state = out / "trainer_state.json"
            history = json.loads(state.read_text())["log_history"] if state.is_file() else []
            row["losses"] = [round(entry["loss"], 4) for entry in history if "loss" in entry]
            row["saved"] = (out / "model.safetensors").is_file()
            ok = result.returncode == 0 and len(row["losses"]) == 3 and row["saved"]
            row["status"] = "ok" if ok else f"error: exit {result.returncode}: {result.stderr.strip()[-400:]}"
        except AssertionError as e:  # tests/cli.py's timeout, the process tree killed
            row |= {"losses": None, "saved": False, "status": f"error: {str(e).splitlines()[0]}"}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        report.add("fsdp", row)


def recipe_field(recipe: str, key: str) -> Any:
    return yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())[key]


def recipe_batch(recipe: str, tiny: bool) -> int:
    """The recipe's own per-device batch (OpenVLA QLoRA: 8, with 2 accumulation steps this run leaves out)."""
    return TINY_BATCH if tiny else recipe_field(recipe, "per_device_train_batch_size")


def run_family(
    model_type: str,
    args: argparse.Namespace,
    data: Data,
    tmp: Path,
    device: Device,
    report: Report,
    deadline: Deadline,
    ready: Callable[[], None],
) -> None:
    """Every row of one family; ``ready`` waits for whatever else uses the device before the first timed step."""
    reserve = ROW_RESERVE_S[device.type][model_type]
    base = tmp / f"{model_type}-base"
    status, figures = guarded(
        lambda: {"base": write_base(model_type, data, base, device, args.tiny)}, device, deadline, 0
    )
    print(f"[{model_type}] random base written to {base} in {figures.get('wall_s')} s: {status}", flush=True)
    ready()
    for recipe in RECIPES[model_type]:
        batch = recipe_batch(recipe, args.tiny)
        for ckpt in (True, False):
            folder = tmp / f"{recipe.replace('/', '-')}-{ckpt}"
            row = {"family": model_type, "mode": recipe.rsplit("/", 1)[1], "grad_ckpt": ckpt, "batch": batch}
            row |= {"peak_gb": None, "s_per_step": None, "samples_per_s": None}
            status, figures = ("skipped: no base model", {}) if not base.is_dir() else guarded(
                partial(train_row, recipe, base, data, folder, device, batch, args.steps, ckpt),
                device, deadline, reserve,
            )  # fmt: skip
            report.add("train", row | figures | {"status": status})
            shutil.rmtree(folder, ignore_errors=True)
    if model_type == "pi05":
        batch = recipe_batch(RECIPES["pi05"][0], args.tiny)
        for ckpt in (True, False):
            folder = tmp / f"lerobot-{ckpt}"
            folder.mkdir()
            status, figures = guarded(
                partial(lerobot_row, data, folder, device, batch, args.steps, ckpt, args.tiny),
                device, deadline, ROW_RESERVE_S[device.type]["lerobot"],
            )  # fmt: skip
            row = {"grad_ckpt": ckpt, "batch": batch, "peak_gb": None, "s_per_step": None}
            report.add("lerobot", row | figures | {"status": status})
    status, figures = ("skipped: no base model", {}) if not base.is_dir() else guarded(
        partial(latency_rows, RECIPES[model_type][0], base, data, tmp / "latency", device, args.repeats),
        device, deadline, reserve,
    )  # fmt: skip
    for batch in LATENCY_BATCHES:
        row = {"family": model_type, "batch": batch, "ms_per_chunk": figures.get(batch), "status": status}
        report.add("latency", row)
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the CPU check: tiny configs, batch 2, same code")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu", help="where gpu.json / gpu.md go")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per row after 1 warm-up (3; --tiny: 1)")
    parser.add_argument("--repeats", type=int, help="timed predict_action calls per latency figure (5; --tiny: 1)")
    parser.add_argument("--deadline", type=float, help="hard limit in seconds (default: 450 on CUDA, 170 with --tiny)")
    parser.add_argument("--tmp", type=Path, help="folder for the random bases (~16 GB free at the real sizes)")
    parser.add_argument("--families", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="e.g. a rerun")
    parser.add_argument("--no_fsdp", action="store_true", help="leave out the 1-process FSDP2 runs (e.g. a rerun)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; `python benchmarks/gpu.py --tiny` runs the CPU check of this script")
    device = Device("cpu" if args.tiny else "cuda")
    args.steps = args.steps or (1 if args.tiny else 3)
    args.repeats = args.repeats or (1 if args.tiny else 5)
    import peft
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    with contextlib.suppress(ImportError):
        import bitsandbytes

        versions += f", bitsandbytes {bitsandbytes.__version__}"
    header = {"device": device.name(), "tiny": args.tiny, "steps": args.steps, "versions": versions}
    header["dtype"] = str(device.dtype).removeprefix("torch.")
    report = Report(args.out, header | {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    deadline = Deadline(args.deadline or (170.0 if args.tiny else 450.0), report)
    print(f"# GPU check on {header['device']}; {versions}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_dir:
        tmp = Path(tmp_dir)
        samples = max(*(recipe_batch(r, args.tiny) for f in args.families for r in RECIPES[f]), *LATENCY_BATCHES)
        root = synthetic_data(tmp, 1, samples).root  # written once (both cameras), read for each family's horizon
        # The tiny FSDP runs overlap the first base's construction and are done before anything is timed.
        demos = () if args.no_fsdp else FSDP_DEMOS[device.type]
        fsdp = threading.Thread(target=fsdp_rows, args=(demos, root, tmp, device, report), daemon=True)
        fsdp.start()
        for model_type in args.families:
            data = synthetic_data(tmp, recipe_field(RECIPES[model_type][0], "action_horizon"), samples)
            run_family(model_type, args, data, tmp, device, report, deadline, ready=fsdp.join)
        fsdp.join()
    report.write()
    print("\n" + (args.out / "gpu.md").read_text(), flush=True)
    if report.errors():
        sys.exit(f"error: {len(report.errors())} row(s) failed (see the tracebacks above)")


if __name__ == "__main__":
    main()
