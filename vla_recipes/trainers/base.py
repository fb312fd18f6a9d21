"""``VLATrainer``: the ``transformers.Trainer`` every model family's trainer builds on.

It adds what VLA fine-tuning needs on top of the stock loop: per-family metrics (action accuracy, action L1, ...)
logged next to the loss in train and eval, averaged over the logging window and across processes (kept on the device
between logs, see ``MetricSums``), and an evaluation step that runs the same loss code as training. It also makes
checkpoints atomic (a callback around the Trainer's save, see ``checkpointing``), resumes exactly (the dataset's
epoch, optimizer state on a multi-process CPU run) and stops on a non-finite loss before anything is saved after it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy

from vla_recipes import checkpointing
from vla_recipes.configs import RecipeError
from vla_recipes.trainers.metric_sums import MetricSums

logger = logging.getLogger(__name__)


class NonFiniteError(RecipeError):
    """The training loss became NaN or inf: the run stops at that step, before saving anything after it."""


class _DatasetEpoch(TrainerCallback):
    """Tell the train dataset the epoch before each pass, so per-sample randomness can depend on it.

    accelerate's dataloader calls ``dataset.set_epoch`` only when its sampler has no ``set_epoch``;
    the seedable sampler of a multi-process run has one, so there the Trainer must do it.
    ``int(state.epoch)`` is the epoch starting, also after a mid-epoch resume.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class _Throughput(TrainerCallback):
    """Throughput and memory of each logging window, for every training log (the Trainer reports throughput only
    once, at the end): ``samples_per_second`` (evaluation time left out; counted from the first step this run
    takes, so right after a resume too) and, on CUDA, ``gpu_mem_peak_gb`` (peak allocated in the window)."""

    def __init__(self) -> None:
        self._start: tuple[float, int] | None = None  # (time, global_step) at the window's start
        self._paused = 0.0  # evaluation seconds inside the window

    def on_step_begin(self, args, state, control, **kwargs):
        if self._start is None:
            self._start = (time.perf_counter(), state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._paused += (metrics or {}).get("eval_runtime", 0.0)

    def window(self, args, state) -> dict[str, float]:
        """The figures since the last call; starts the next window."""
        logs, now = {}, time.perf_counter()
        if self._start is not None:
            seconds = now - self._start[0] - self._paused
            samples = (state.global_step - self._start[1]) * args.train_batch_size
            samples *= args.gradient_accumulation_steps * args.world_size
            logs["samples_per_second"] = round(samples / max(seconds, 1e-9), 3)
        if args.device.type == "cuda":
            logs["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(args.device)
        self._start, self._paused = (now, state.global_step), 0.0
        return logs


class _NonFiniteLoss(TrainerCallback):
    """Stop on a NaN/inf training loss before anything is logged, evaluated or saved after it.

    Each micro-step only records, on the device, the first step whose loss was not finite (and that loss): reading
    it every step would make the host wait for the device at every step. It is read, and gathered across processes
    (every process reaches the same points), where it matters: before a log, an evaluation, a save, and the end.
    """

    def __init__(self, trainer: VLATrainer) -> None:
        self.trainer = trainer
        self.step: torch.Tensor | None = None  # 0: every loss so far finite
        self.value: torch.Tensor | None = None

    def record(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float().reshape(())
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.long, device=loss.device)
            self.value = torch.zeros((), device=loss.device)
        first = (self.step == 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def check(self, args) -> None:
        if self.step is None:
            return
        steps = self.step.reshape(1)
        if args.world_size > 1:
            steps = self.trainer.accelerator.gather(steps)
        found = [step for step in steps.tolist() if step]
        if not found:
            return
        step = min(found)
        value = self.value.item() if self.step.item() == step else "not finite on another process"
        last = checkpointing.last_complete_checkpoint(args.output_dir)
        kept = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was saved before it"
        raise NonFiniteError(
            f"the training loss is {value} at step {step}; stopped, nothing saved after it ({kept}); look for "
            "NaN/inf in the data, or lower learning_rate before resuming"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.check(args)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.check(args)


class _AtomicCheckpoints(TrainerCallback):
    """Make every checkpoint atomic (see ``checkpointing``) around the Trainer's own save.

    Before a save: half-written checkpoints are deleted (so ``save_total_limit`` never keeps one instead of a
    complete checkpoint, nor does the new save write into a stale folder of its step). After it, once every process
    wrote its files: the run's ``recipe.json`` and then the completion mark.
    """

    def __init__(self, recipe: Callable[[], dict | None]) -> None:
        self.recipe = recipe

    def _before_save(self, args, control) -> None:
        if control.should_save:
            if args.should_save:
                checkpointing.remove_incomplete_checkpoints(args.output_dir)
            PartialState().wait_for_everyone()

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, control)

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if (recipe := self.recipe()) is not None:
                checkpointing.write_recipe(folder, recipe)
            checkpointing.mark_complete(folder, state.global_step)


class _PushedCheckpointMark(TrainerCallback):
    """A checkpoint pushed to the Hub (``hub_strategy: checkpoint`` or ``all_checkpoints``) gets its completion mark
    and ``recipe.json`` there too, so a Hub checkpoint is complete exactly when it has the mark, as a local one.

    transformers pushes a checkpoint's files inside its save, before ``on_save`` writes the mark: the mark follows as
    a second commit, queued behind the files (huggingface_hub runs ``run_as_future`` uploads one at a time, in order).
    Only a checkpoint transformers did push gets one: it skips a save while the previous push is still running.
    """

    def __init__(self, trainer: VLATrainer) -> None:
        self.trainer = trainer
        self._jobs_before_save: tuple[int, int] | None = None

    def _jobs(self) -> tuple[int, int] | None:
        push = getattr(self.trainer, "push_in_progress", None)
        return None if push is None else (id(push), len(push.jobs))

    def on_step_end(self, args, state, control, **kwargs):
        self._jobs_before_save = self._jobs()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._jobs_before_save = self._jobs()

    def on_save(self, args, state, control, **kwargs):
        strategy = HubStrategy(args.hub_strategy)
        pushes_checkpoints = strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)
        if not (args.push_to_hub and pushes_checkpoints and args.should_save) or self._jobs() == self._jobs_before_save:
            return
        from huggingface_hub import upload_folder

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        job = upload_folder(
            repo_id=self.trainer.hub_model_id,
            folder_path=folder,
            path_in_repo="last-checkpoint" if strategy == HubStrategy.CHECKPOINT else os.path.basename(folder),
            allow_patterns=[checkpointing.COMPLETE_MARK, checkpointing.RECIPE_NAME],
            commit_message=f"Checkpoint of step {state.global_step} complete",
            token=args.hub_token,
            revision=args.hub_revision,
            run_as_future=True,
        )
        self.trainer.push_in_progress.jobs.append(job)  # the final push waits for it too


class VLATrainer(Trainer):
    """Subclasses implement :meth:`compute_metrics_from_outputs`; everything else is shared.

    ``recipe``: the run's arguments (``checkpointing.run_recipe``), written into every checkpoint as
    ``recipe.json`` so that a resume can tell what changed since.
    """

    recipe: dict | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = {"train": MetricSums(), "eval": MetricSums()}
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_DatasetEpoch(self.train_dataset))
        self._nonfinite = _NonFiniteLoss(self)
        self.add_callback(self._nonfinite)  # before _AtomicCheckpoints: a bad loss stops the run before a save
        self.add_callback(_AtomicCheckpoints(lambda: self.recipe))
        self.add_callback(_PushedCheckpointMark(self))  # after _AtomicCheckpoints: it pushes the mark that one writes
        self._throughput = _Throughput()
        self.add_callback(self._throughput)
        self._flop_parameters: int | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``resume_from_checkpoint=True`` is the newest *complete* checkpoint (transformers would take any); one
        without its optimizer or scheduler state is refused, and the one resumed is logged with its step."""
        resume = checkpointing.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            checkpointing.check_optimizer_state(resume)
            if self.is_world_process_zero():
                logger.info("resuming from %s (global step %s)", resume, checkpointing.checkpoint_step(resume))
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite.record(loss, self.state.global_step + 1)
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """On a multi-process CPU (gloo) run, load onto plain ``cpu``.

        transformers loads the optimizer with ``map_location=args.device`` when ``world_size > 1``, which is
        ``cpu:<rank>`` there, and torch cannot restore tensors to that location.
        """
        plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu" or not plain:
            return super()._load_optimizer_and_scheduler(checkpoint)
        for obj, name in ((self.optimizer, OPTIMIZER_NAME), (self.lr_scheduler, SCHEDULER_NAME)):
            obj.load_state_dict(torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True))

    def compute_metrics_from_outputs(
        self, inputs: dict, outputs
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Scalar metrics of one micro-batch (no grad), kept on the device; the loss itself is logged by the Trainer.
        A ``(value, count)`` pair weights the value in the window's mean (count 0: the metric does not apply to this
        micro-batch), decided on the device: a Python ``if`` on a tensor would make the host wait every step."""
        return {}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            for name, value in self.compute_metrics_from_outputs(inputs, outputs).items():
                self._metrics[mode].add(name, *(value if isinstance(value, tuple) else (value,)))
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """Eval runs the training loss (and its metrics); no logits are kept."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{name}": value for name, value in self._metrics[mode].means(self.accelerator).items()})
        if "loss" in logs:  # a training log (not eval, not the end-of-training summary)
            logs.update(self._throughput.window(self.args, self.state))
        super().log(logs, start_time)

    def floating_point_ops(self, inputs: dict) -> int:
        """The Trainer's estimate (6 x input tokens x non-embedding parameters) with the parameters counted once,
        not on every step (that walk over every parameter was ~3 ms of a 70 ms tiny step)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters
