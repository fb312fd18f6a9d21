"""Inference: batched ``predict_action`` at batch 8 vs 8 calls at batch 1, same model, same observations; and
OpenVLA-OFT's parallel decoding vs OpenVLA's autoregressive decoding at the same model size.

OpenVLA's own ``predict_action`` takes one observation per call, so 8 calls at batch 1 is what a user of it runs;
ours takes a batch. Goal: >= 3x the observations per CPU second. Rows: the tiny OpenVLA, the tiny pi0.5 with its
default fused attention (SDPA) and with LeRobot's eager attention (``attn_implementation="eager"``).

OFT vs OpenVLA: the same tiny backbone and language model, batch 8, actions per CPU second. OpenVLA generates its
7 action tokens one at a time (one action per call; a chunk of 8 generated token by token for comparison); OFT
decodes a chunk of 8 actions (56 placeholders) in one forward pass, with one camera as OpenVLA and with LIBERO's
inputs (two cameras + proprio). Goal: >= 10x OpenVLA's actions per second (the paper: 26x on a GPU).

    BENCH_THREADS=1 python benchmarks/inference.py [--batch 8] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import best_cpu_time, build_model, machine, print_table, seen_by, synthetic_data

from vla_recipes.data.collators import observations

GOAL = 3.0
OFT_GOAL = 10.0


def throughput(model, processor, family, samples: list[dict], repeats: int) -> tuple[float, float]:
    """Observations per CPU second: one call on all ``samples``, and one call per sample."""
    batched = processor(**observations(samples))
    singles = [processor(**observations([sample])) for sample in samples]
    batch_time = best_cpu_time(lambda: model.predict_action(**batched), repeats)
    single_time = best_cpu_time(lambda: [model.predict_action(**inputs) for inputs in singles], repeats)
    return len(samples) / batch_time, len(samples) / single_time


def actions_per_second(model, processor, family, samples: list[dict], repeats: int) -> float:
    """Actions (chunk steps) per CPU second of one batched ``predict_action`` call."""
    inputs = processor(**observations(samples))
    return len(samples) * model.config.action_horizon / best_cpu_time(lambda: model.predict_action(**inputs), repeats)


def parallel_vs_autoregressive(folder: Path, batch: int, repeats: int) -> None:
    """OpenVLA-OFT's one-pass chunk against OpenVLA's token-by-token decoding, same tiny model size."""
    rows, reference = [], None
    cases = (  # (model_type, chunk, cameras, state, label)
        ("openvla", 1, 1, False, "autoregressive, 7 tokens per action"),
        ("openvla", 8, 1, False, "autoregressive, chunk of 8 (56 tokens)"),
        ("openvla_oft", 8, 1, False, "parallel, chunk of 8, 1 camera"),
        ("openvla_oft", 8, 2, True, "parallel, chunk of 8, 2 cameras + proprio"),
    )
    for model_type, chunk, cameras, state, label in cases:
        data = synthetic_data(folder, chunk, batch)
        out = folder / f"{model_type}-{chunk}-{cameras}"
        model, processor, family = build_model(model_type, data, out, cameras=cameras, state=state)
        model.eval()
        torch.manual_seed(0)
        samples = [{**sample, "images": sample["images"][:cameras]} for sample in data.samples]
        rate = actions_per_second(model, processor, family, samples, repeats)
        reference = reference or rate
        ratio = rate / reference
        met = "" if model_type == "openvla" else ("met" if ratio >= OFT_GOAL else "not met")
        rows.append([f"{model_type} tiny", label, rate, f"**{ratio:.2f}x**", met])
    print_table(
        f"Inference: OpenVLA-OFT parallel decoding vs autoregressive OpenVLA, batch {batch} (CPU time, best of "
        f"{repeats})",
        ["model", "decoding", "actions/s", "vs OpenVLA", f"goal >= {OFT_GOAL:g}x"],
        rows,
    )


def profile(model, processor, family, samples: list[dict]) -> None:
    """Where a batched pi0.5 call spends its CPU time, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = processor(**observations(samples))
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
                samples = seen_by(model.config, data.samples)
                batched, single = throughput(model, processor, family, samples, args.repeats)
                ratio = batched / single
                met = "met" if ratio >= GOAL else "not met"
                rows.append([f"{model_type} tiny", implementation, batched, single, f"**{ratio:.2f}x**", met])
                if args.profile and model_type == "pi05" and attn is None:
                    profile(model, processor, family, samples)
    header = ["model", "attention", f"batch {args.batch} (obs/s)", f"{args.batch} x batch 1 (obs/s)", "ratio"]
    print_table(
        f"Inference: batched predict_action vs batch-1 calls (CPU time, best of {args.repeats})",
        [*header, f"goal >= {GOAL:g}x"],
        rows,
    )
    with tempfile.TemporaryDirectory() as tmp:
        parallel_vs_autoregressive(Path(tmp), args.batch, args.repeats)


if __name__ == "__main__":
    main()
