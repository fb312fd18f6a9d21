"""Memory: full vs LoRA vs QLoRA fine-tuning, measured on the tiny models and estimated for the real sizes.

Measured (tiny OpenVLA and tiny pi0.5, each mode in its own process, built by the recipe code path and trained for
``--steps`` AdamW steps at ``--batch``): the bytes of the weights (4-bit blocks and their scales included), of the
gradients and of AdamW's state, and the process's peak RSS. At tiny sizes activations and the libraries dominate the
RSS, so the weights+grads+AdamW column is the one the modes change.

Estimated (no GPU here: parameter counts of openvla/openvla-7b and lerobot/pi05_base built on the meta device):
weights in bfloat16 (pi0.5 keeps LeRobot's float32 modules), gradients and AdamW's two moments in each trainable
parameter's dtype; LoRA adapters (rank ``ModelArguments.lora_r``, the model's own target modules) and PEFT's
``modules_to_save`` copies in float32; QLoRA's quantised linears (transformers' own skip rules) as nf4, 0.5 byte per
weight plus one float32 scale per 64, every other weight in float32 (``prepare_model_for_kbit_training`` upcasts
them). Activations are not included. The same rules applied to the tiny models are printed next to their
measurements, as a check of the rules.

    BENCH_THREADS=1 python benchmarks/memory.py [--steps 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import THREADS, build_model, machine, print_table, synthetic_data
from torch import nn

MODES = ("full", "lora", "qlora")
MODELS = {"openvla": 1, "pi05": 10}  # model type -> action horizon of its samples
MIB, GIB = 2**20, 2**30
NF4_BYTES = 0.5 + 4 / 64  # nf4 weight + one float32 absmax per block of 64 (bnb default, no double quantisation)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model: nn.Module) -> int:
    """Parameter and buffer storage, with the 4-bit weights' quantisation scales."""
    total = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            total += tensor_bytes([state.absmax]) + (tensor_bytes([state.code]) if state.code is not None else 0)
            state = getattr(state, "state2", None)
    return total


def measure_one(model_type: str, mode: str, root: Path, steps: int, batch: int) -> dict:
    """Build ``model_type`` in ``mode`` and train it ``steps`` steps; figures of this process only."""
    data = synthetic_data(root.parent, MODELS[model_type], batch)
    baseline = rss_bytes()
    with tempfile.TemporaryDirectory() as out:
        model, processor, family = build_model(model_type, data, Path(out), finetune_mode=mode)
        collator = family.make_trainer(
            model=model, args=None, processor=processor, train_dataset=None, eval_dataset=None
        ).data_collator
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        inputs = collator(data.samples)
        for _ in range(steps):
            optimizer.zero_grad()
            model(**inputs).loss.backward()
            grads = tensor_bytes(p.grad for p in params if p.grad is not None)
            optimizer.step()
        adamw = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if t.ndim > 0)
        return {
            "weights": weight_bytes(model),
            "grads": grads,
            "adamw": adamw,
            "trainable": sum(p.numel() for p in params),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "baseline_rss": baseline,
        }


def measure(model_type: str, mode: str, root: Path, steps: int, batch: int) -> dict:
    """``measure_one`` in a fresh process, so the peak RSS is this mode's alone."""
    command = [sys.executable, __file__, "--one", model_type, mode, "--root", str(root)]
    command += ["--steps", str(steps), "--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model_type} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Estimates from parameter counts.


def build_on_meta(model_type: str, tiny: bool, dtype: torch.dtype) -> nn.Module:
    """The model without memory: openvla-7b / pi0.5 base (or the tiny configs), parameters in ``dtype``."""
    from _common import tiny_config
    from transformers import AutoConfig

    from vla_recipes.families import get_family

    fields = tiny_config(model_type) if tiny else {"model_type": model_type}
    config = AutoConfig.for_model(**fields)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return get_family(model_type).model_class(config)
    finally:
        torch.set_default_dtype(default)


def estimate(model: nn.Module, mode: str, lora_r: int, modules_to_save: list[str] | None) -> dict:
    """Weights, gradients and AdamW bytes of ``model`` fine-tuned in ``mode`` (rules in the module docstring)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    params = dict(model.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    if mode == "full":
        weights = tensor_bytes(params.values())
        grads = tensor_bytes(trainable)
        return {"weights": weights, "grads": grads, "adamw": 2 * grads, "trainable": sum(p.numel() for p in trainable)}

    targets = [model.get_submodule(name) for name in model.lora_target_modules()]
    adapters = lora_r * sum(layer.in_features + layer.out_features for layer in targets)
    saved_names = tuple(modules_to_save or [])  # PEFT matches them by the end of the module name
    saved = [p for name, module in model.named_modules() if name.endswith(saved_names) for p in module.parameters()]
    if mode == "lora":
        weights = tensor_bytes(params.values()) + 4 * adapters + tensor_bytes(saved)
        grads = 4 * adapters + tensor_bytes(saved)
    else:
        skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
        quantised = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if type(module) is nn.Linear and should_convert_module(name, skip)
        }
        grads = 4 * adapters + 4 * sum(p.numel() for p in saved)
        base = sum(p.numel() * (NF4_BYTES if name in quantised else 4) for name, p in params.items())
        weights = base + grads  # the float32 adapters and saved copies weigh what their gradients weigh
    trainable = adapters + sum(p.numel() for p in saved)
    return {"weights": int(weights), "grads": grads, "adamw": 2 * grads, "trainable": trainable}


def total(figures: dict) -> int:
    return figures["weights"] + figures["grads"] + figures["adamw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps per measured run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.root, args.steps, args.batch)))
        return

    from vla_recipes.configs import ModelArguments
    from vla_recipes.families import get_family

    print(f"# Memory benchmark\n\n{machine()}")
    lora_r = ModelArguments(model_config={"model_type": "openvla"}).lora_r
    measured, estimated = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic_reach"
        synthetic_data(Path(tmp), 1, args.batch)  # written once, read by every process
        for model_type in MODELS:
            tiny = build_on_meta(model_type, tiny=True, dtype=torch.float32)
            modules_to_save = get_family(model_type).modules_to_save(tiny)
            full = None
            for mode in MODES:
                start = time.perf_counter()
                got = measure(model_type, mode, root, args.steps, args.batch)
                rule = estimate(tiny, mode, lora_r, modules_to_save)
                full = full or got
                measured.append([
                    f"{model_type} tiny", mode, f"{got['trainable']:,}", f"{total(got) / MIB:.2f}",
                    f"{total(rule) / MIB:.2f}", f"{total(got) / total(full):.2f}", f"{got['peak_rss'] / MIB:.0f}",
                    f"{(got['peak_rss'] - got['baseline_rss']) / MIB:.0f}", f"{time.perf_counter() - start:.0f}",
                ])  # fmt: skip
            real = build_on_meta(model_type, tiny=False, dtype=torch.bfloat16)
            modules_to_save = get_family(model_type).modules_to_save(real)
            full = estimate(real, "full", lora_r, modules_to_save)
            for mode in MODES:
                rule = estimate(real, mode, lora_r, modules_to_save)
                name = "openvla-7b" if model_type == "openvla" else "pi0.5 base"
                estimated.append([
                    f"{name} (estimated)", mode, f"{sum(p.numel() for p in real.parameters()) / 1e9:.2f}B",
                    f"{rule['trainable'] / 1e6:.1f}M", f"{rule['weights'] / GIB:.1f}", f"{rule['grads'] / GIB:.2f}",
                    f"{rule['adamw'] / GIB:.2f}", f"**{total(rule) / GIB:.1f}**", f"{total(rule) / total(full):.2f}",
                ])  # fmt: skip
    print_table(
        f"Memory, tiny models: {args.steps} AdamW steps at batch {args.batch}, BENCH_THREADS={THREADS}",
        ["model", "mode", "trainable params", "weights+grads+AdamW (MiB)", "rule (MiB)", "vs full", "peak RSS (MiB)",
         "RSS growth (MiB)", "wall s"],
        measured,
    )  # fmt: skip
    print_table(
        f"Memory, real sizes (estimated from parameter counts; LoRA r={lora_r}; activations excluded)",
        ["model", "mode", "params", "trainable", "weights (GiB)", "grads (GiB)", "AdamW (GiB)", "total (GiB)",
         "vs full"],
        estimated,
    )  # fmt: skip


if __name__ == "__main__":
    main()
