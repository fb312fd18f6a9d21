"""Training step: our trainers vs the loops a user would otherwise run, same model, batch and samples.

- pi0.5: ``FlowMatchingTrainer`` vs LeRobot's own training step (``lerobot-train``'s loop body: its DataLoader,
  pre-processor and ``lerobot_train.update_policy``, with the policy's AdamW and scheduler presets under accelerate)
  on LeRobot's tiny ``PI05Policy``, built as tests/lerobot_pi05_reference.py builds it. Our model loads that very
  LeRobot folder, so both start from the same weights (parameter counts asserted equal).
  ``lerobot-train`` itself builds only the real-size pi0.5 and fetches the gated PaliGemma tokenizer, hence the loop.
- OpenVLA: ``OpenVLATrainer`` vs a plain PyTorch loop (DataLoader, forward, backward, clip, AdamW, scheduler) on the
  same tiny OpenVLA and collator.

A step is timed from the end of one optimizer step to the end of the next (data fetch and collation included), in
process CPU time; the first step of each block is a warm-up and is not counted. Ours and the peer alternate in
``--blocks`` blocks, so drift in machine load hits both. Goal: <= 1.05x the peer's time per step.

    BENCH_THREADS=1 python benchmarks/train_step.py [--steps 6] [--openvla_steps 32] [--blocks 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import CAMERAS, ROOT, Data, build_model, machine, print_table, synthetic_data
from transformers import TrainerCallback, get_scheduler

from vla_recipes.configs import VLATrainingArguments
from vla_recipes.families import get_family

GOAL = 1.05


class StepClock(TrainerCallback):
    """``clock()`` at the end of every optimizer step (process CPU time by default)."""

    def __init__(self, clock: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.marks.append(self.clock())


def intervals(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def training_args(output_dir: Path, batch: int, steps: int, **optimizer) -> VLATrainingArguments:
    """One block: ``steps`` timed steps after a warm-up step; no logging, evaluation or saving inside it."""
    return VLATrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        max_steps=steps + 1,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **optimizer,
    )


def trainer_block(trainer) -> list[float]:
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    trainer.remove_callback(clock)
    return intervals(clock.marks)


# pi0.5: FlowMatchingTrainer vs LeRobot's training step.


def lerobot_pi05(data: Data, folder: Path):
    """LeRobot's tiny PI05Policy with its pre-processor, saved to ``folder``; the monkeypatches stay on."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pytest
    from lerobot_pi05_reference import build_reference

    from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
    from vla_recipes.models.pi05 import TINY_PI05_CONFIG

    tokenizer_dir = folder / "tokenizer"
    build_gemma_like_tokenizer().save_pretrained(tokenizer_dir)
    stats = {
        key: {name: torch.as_tensor(value) for name, value in data.meta.stats[key].items()}
        for key in ("observation.state", "action")
    }
    config = {**TINY_PI05_CONFIG, "camera_keys": list(CAMERAS), "action_dim": 7, "state_dim": 8}
    monkeypatch = pytest.MonkeyPatch()  # kept for the process: the policy's tokenizer loader stays local
    return build_reference("pi05", monkeypatch, folder / "lerobot", tokenizer_dir, stats, config)


def lerobot_sample(sample: dict) -> dict:
    """One of our samples as LeRobotDataset yields it (camera keys, state, action chunk, task)."""
    cameras = dict(zip(CAMERAS, sample["images"], strict=True))
    return {
        **cameras,
        "observation.state": sample["state"],
        "action": sample["actions"],
        "action_is_pad": sample["action_is_pad"],
        "task": sample["task"],
    }


class LeRobotLoop:
    """``lerobot-train``'s setup and loop body for a policy already built (the rest of it is I/O and logging)."""

    def __init__(
        self,
        reference,
        samples: list[dict],
        batch: int,
        total_steps: int,
        *,
        cpu: bool = True,
        mixed_precision: str = "no",
        clock: Callable[[], float] = time.process_time,
    ) -> None:
        """``cpu`` / ``mixed_precision``: what ``accelerate launch`` would give lerobot-train; ``clock``: the time a
        step is measured in (process CPU time here, synchronised wall time on a GPU)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from lerobot.utils.logging_utils import AverageMeter, MetricsTracker
        from lerobot.utils.utils import cycle

        policy = reference.policy
        self.preprocessor = reference.preprocessor
        self.grad_clip_norm = policy.config.get_optimizer_preset().grad_clip_norm
        optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
        scheduler = policy.config.get_scheduler_preset().build(optimizer, total_steps)
        self.accelerator = Accelerator(
            step_scheduler_with_optimizer=False,
            mixed_precision=mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            cpu=cpu,
        )
        self.clock = clock
        loader = torch.utils.data.DataLoader([lerobot_sample(s) for s in samples], batch_size=batch, shuffle=True)
        self.policy, self.optimizer, loader, self.scheduler = self.accelerator.prepare(
            policy, optimizer, loader, scheduler
        )
        self.batches = cycle(loader)
        meters = {
            "loss": AverageMeter("loss", ":.3f"),
            "grad_norm": AverageMeter("grdn", ":.3f"),
            "lr": AverageMeter("lr", ":0.1e"),
            "update_s": AverageMeter("updt_s", ":.3f"),
            "dataloading_s": AverageMeter("data_s", ":.3f"),
        }
        self.tracker = MetricsTracker(batch, len(samples), 1, meters, initial_step=0, accelerator=self.accelerator)

    def block(self, steps: int) -> list[float]:
        from lerobot.scripts.lerobot_train import update_policy

        marks = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            batch = self.preprocessor(next(self.batches))
            self.tracker.dataloading_s = time.perf_counter() - start
            self.tracker, _ = update_policy(
                self.tracker,
                self.policy,
                batch,
                self.optimizer,
                self.grad_clip_norm,
                accelerator=self.accelerator,
                lr_scheduler=self.scheduler,
            )
            self.tracker.step()
            marks.append(self.clock())
        return intervals(marks)


def pi05_trainer(reference, samples: list[dict], batch: int, steps: int, output_dir: Path, attn: str | None = None):
    """FlowMatchingTrainer on our model loaded from LeRobot's folder, with LeRobot's optimizer settings."""
    from lerobot_pi05_reference import TINY_SIZES

    from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
    from vla_recipes.models.pi05 import Pi05ForActionPrediction, Pi05Processor

    kwargs = {"attn_implementation": attn} if attn else {}
    model = Pi05ForActionPrediction.from_pretrained(reference.folder, **TINY_SIZES, **kwargs)
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for p in reference.policy.parameters())
    assert ours == theirs, f"not the same model: {ours} vs {theirs} parameters"
    processor = Pi05Processor.from_model_config(model.config, build_gemma_like_tokenizer())
    preset = reference.policy.config.get_optimizer_preset()
    args = training_args(
        output_dir,
        batch,
        steps,
        learning_rate=preset.lr,
        adam_beta1=preset.betas[0],
        adam_beta2=preset.betas[1],
        adam_epsilon=preset.eps,
        weight_decay=preset.weight_decay,
        max_grad_norm=preset.grad_clip_norm,
        lr_scheduler_type="cosine",
        warmup_steps=reference.policy.config.scheduler_warmup_steps,
    )
    trainer = get_family("pi05").make_trainer(
        model=model, args=args, processor=processor, train_dataset=samples, eval_dataset=None
    )
    return trainer, ours


# OpenVLA: OpenVLATrainer vs a plain PyTorch loop.


class PlainLoop:
    """What one writes without a trainer: DataLoader, forward, backward, clip, AdamW, scheduler, zero_grad."""

    def __init__(self, model, collator, samples: list[dict], args: VLATrainingArguments, total_steps: int) -> None:
        from lerobot.utils.utils import cycle

        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        self.scheduler = get_scheduler(
            args.lr_scheduler_type, self.optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps
        )
        self.max_grad_norm = args.max_grad_norm
        loader = torch.utils.data.DataLoader(samples, batch_size=args.per_device_train_batch_size, shuffle=True)
        loader.collate_fn = collator
        self.batches = cycle(loader)

    def block(self, steps: int) -> list[float]:
        marks = []
        for _ in range(steps + 1):
            loss = self.model(**next(self.batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            marks.append(time.process_time())
        return intervals(marks)


def openvla_pair(data: Data, batch: int, steps: int, folder: Path):
    """OpenVLATrainer and a plain loop, each on its own copy of the same tiny OpenVLA (same seed, same weights)."""
    model, processor, family = build_model("openvla", data, folder / "openvla")
    args = training_args(folder / "openvla-trainer", batch, steps, learning_rate=1e-4)
    trainer = family.make_trainer(
        model=model, args=args, processor=processor, train_dataset=data.samples, eval_dataset=None
    )
    plain_model, _, _ = build_model("openvla", data, folder / "openvla-plain")
    plain = PlainLoop(plain_model, trainer.data_collator, data.samples, args, total_steps=10_000)
    return trainer, plain, sum(p.numel() for p in model.parameters())


def row(name: str, params: int, ours: list[float], peer: list[float], peer_name: str) -> list:
    mine, theirs = statistics.median(ours), statistics.median(peer)
    ratio = mine / theirs
    met = "met" if ratio <= GOAL else "not met"
    return [name, f"{params / 1e6:.2f}M", mine, peer_name, theirs, f"**{ratio:.2f}x**", met]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed pi0.5 steps per block")
    parser.add_argument("--openvla_steps", type=int, default=32, help="timed OpenVLA steps per block (~0.07 s each)")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of ours and the peer")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"# Training-step benchmark\n\n{machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        samples = 4 * args.batch

        data = synthetic_data(folder, 1, samples)
        trainer, plain, params = openvla_pair(data, args.batch, args.openvla_steps, folder)
        ours, peer = [], []
        for _ in range(args.blocks):
            ours += trainer_block(trainer)
            peer += plain.block(args.openvla_steps)
        rows.append(row("OpenVLA tiny: OpenVLATrainer", params, ours, peer, "plain PyTorch loop"))

        data = synthetic_data(folder, 10, samples)
        reference = lerobot_pi05(data, folder)
        trainers = {
            attn: pi05_trainer(reference, data.samples, args.batch, args.steps, folder / f"pi05-{attn}", attn)
            for attn in ("sdpa", "eager")
        }
        loop = LeRobotLoop(reference, data.samples, args.batch, total_steps=30_000)
        ours, peer = {"sdpa": [], "eager": []}, []
        for _ in range(args.blocks):
            for attn, (trainer, _) in trainers.items():
                ours[attn] += trainer_block(trainer)
            peer += loop.block(args.steps)
        for attn, (_, params) in trainers.items():
            name = f"pi0.5 tiny: FlowMatchingTrainer, {attn} attention"
            rows.append(row(name, params, ours[attn], peer, "LeRobot update_policy step (eager)"))
    print_table(
        f"Training step, batch {args.batch} (CPU s per step, median of {args.blocks} blocks x {args.openvla_steps} "
        f"OpenVLA / {args.steps} pi0.5 steps)",
        ["ours", "params", "s/step", "peer", "peer s/step", "ratio", f"goal <= {GOAL:g}x"],
        rows,
    )


if __name__ == "__main__":
    main()
