"""Inference: batched ``predict_action`` at batch 8 vs 8 calls at batch 1, same model, same observations.

OpenVLA's own ``predict_action`` takes one observation per call, so 8 calls at batch 1 is what a user of it runs;
ours takes a batch. Goal: >= 3x the observations per CPU second. Rows: the tiny OpenVLA, the tiny pi0.5 with its
default fused attention (SDPA) and with LeRobot's eager attention (``attn_implementation="eager"``).

    BENCH_THREADS=1 python benchmarks/inference.py [--batch 8] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import best_cpu_time, build_model, machine, print_table, synthetic_data

GOAL = 3.0


def throughput(model, processor, family, samples: list[dict], repeats: int) -> tuple[float, float]:
    """Observations per CPU second: one call on all ``samples``, and one call per sample."""
    batched = family.inference_inputs(processor, samples)
    singles = [family.inference_inputs(processor, [sample]) for sample in samples]
    batch_time = best_cpu_time(lambda: model.predict_action(**batched), repeats)
    single_time = best_cpu_time(lambda: [model.predict_action(**inputs) for inputs in singles], repeats)
    return len(samples) / batch_time, len(samples) / single_time


def profile(model, processor, family, samples: list[dict]) -> None:
    """Where a batched pi0.5 call spends its CPU time, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = family.inference_inputs(processor, samples)
    model.predict_action(**inputs)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model.predict_action(**inputs)
    print(f"\n### Profile: pi0.5 tiny, batch {len(samples)}, default attention\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (the least CPU time is kept)")
    parser.add_argument("--profile", action="store_true", help="also profile the batched pi0.5 call by operator")
    args = parser.parse_args()
    print(f"# Inference benchmark\n\n{machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, horizon, attentions in (("openvla", 1, [None]), ("pi05", 10, [None, "eager"])):
            data = synthetic_data(Path(tmp), horizon, args.batch)
            for attn in attentions:
                model, processor, family = build_model(model_type, data, Path(tmp) / "out", attn_implementation=attn)
                model.eval()
                implementation = model.config._attn_implementation
                torch.manual_seed(0)
                batched, single = throughput(model, processor, family, data.samples, args.repeats)
                ratio = batched / single
                met = "met" if ratio >= GOAL else "not met"
                rows.append([f"{model_type} tiny", implementation, batched, single, f"**{ratio:.2f}x**", met])
                if args.profile and model_type == "pi05" and attn is None:
                    profile(model, processor, family, data.samples)
    header = ["model", "attention", f"batch {args.batch} (obs/s)", f"{args.batch} x batch 1 (obs/s)", "ratio"]
    print_table(
        f"Inference: batched predict_action vs batch-1 calls (CPU time, best of {args.repeats})",
        [*header, f"goal >= {GOAL:g}x"],
        rows,
    )


if __name__ == "__main__":
    main()
