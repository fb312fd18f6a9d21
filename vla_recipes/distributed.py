"""Distributed runs: what the trainers need around accelerate's strategies (DDP, FSDP2, DeepSpeed).

Nothing here launches processes or wraps models by hand; accelerate does that. This module holds the few things a
recipe must decide itself: which blocks FSDP2 shards per model family, which combinations of strategy and
fine-tuning mode cannot work (refused before any weight is loaded), the full-weights save at the end of a sharded
run, and closing a multi-process run cleanly.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass

from accelerate import PartialState
from accelerate.utils import (
    DeepSpeedPlugin,
    FullyShardedDataParallelPlugin,
    parse_choice_from_env,
    parse_flag_from_env,
    patch_environment,
)
from transformers import PreTrainedModel, Trainer, TrainingArguments

from vla_recipes.configs import ModelArguments, RecipeError
from vla_recipes.families import get_family

# Blocks that break a family's forward when they are FSDP units of their own (see ``Family.fsdp_blocks``).
UNSHARDABLE_BLOCKS = ("GemmaDecoderLayer",)


@dataclass(frozen=True)
class Strategy:
    """What ``accelerate launch`` set up for this process (see :func:`strategy_from_env`)."""

    kind: str  # "single", "ddp", "fsdp" or "deepspeed"
    num_processes: int = 1
    mixed_precision: str = "no"
    fsdp_version: int | None = None
    fsdp_blocks: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap; empty: the family's fsdp_blocks
    fsdp_activation_checkpointing: bool = False
    fsdp_state_dict_type: str | None = None
    fsdp_reshard_after_forward: bool = False  # FSDP2's full shard
    fsdp_cpu_ram_efficient_loading: bool = False
    zero_stage: int | None = None
    zero3_save_16bit_model: bool = False

    @property
    def shards_weights(self) -> bool:
        """Whether each process holds only a shard of the (frozen) weights: FSDP and ZeRO-3."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}" if self.kind == "deepspeed" else self.kind.upper()


def strategy_from_env(env: Mapping[str, str] | None = None) -> Strategy:
    """The strategy of this process as accelerate reads it: the process count from ``PartialState``, the FSDP or
    DeepSpeed settings from the plugin ``Accelerator`` would build (``FullyShardedDataParallelPlugin`` /
    ``DeepSpeedPlugin``, which read the environment ``accelerate launch`` sets), with accelerate's own switches.

    ``env``: the environment of a launch instead of this process's (to check a config before launching); its
    ``WORLD_SIZE`` (what torchrun sets) is then the process count.
    """
    with patch_environment(**env) if env is not None else contextlib.nullcontext():
        processes = int(os.environ.get("WORLD_SIZE", "1")) if env is not None else PartialState().num_processes
        precision = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")
        common = {"num_processes": processes, "mixed_precision": precision}
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
            deepspeed = DeepSpeedPlugin()
            return Strategy(
                "deepspeed",
                zero_stage=int(deepspeed.zero_stage),
                zero3_save_16bit_model=bool(deepspeed.zero3_save_16bit_model),
                **common,
            )
        if parse_flag_from_env("ACCELERATE_USE_FSDP"):
            fsdp = FullyShardedDataParallelPlugin()
            return Strategy(
                "fsdp",
                fsdp_version=fsdp.fsdp_version,
                fsdp_blocks=tuple(fsdp.transformer_cls_names_to_wrap or ()),
                fsdp_activation_checkpointing=bool(fsdp.activation_checkpointing),
                fsdp_state_dict_type=fsdp.state_dict_type.name,
                fsdp_reshard_after_forward=fsdp.reshard_after_forward is True,
                fsdp_cpu_ram_efficient_loading=bool(fsdp.cpu_ram_efficient_loading),
                **common,
            )
    return Strategy("ddp" if common["num_processes"] > 1 else "single", **common)


def check_strategy(
    model_args: ModelArguments, training_args: TrainingArguments, strategy: Strategy | None = None
) -> None:
    """Refuse, before the model is loaded, a combination of strategy and recipe that cannot work."""
    strategy = strategy or strategy_from_env()
    if strategy.shards_weights and model_args.finetune_mode == "qlora":
        storage, dtype = model_args.bnb_4bit_quant_storage, model_args.dtype
        if storage is None or storage != dtype or dtype not in ("bfloat16", "float16", "float32"):
            raise RecipeError(
                f"finetune_mode='qlora' under {strategy.name} shards the 4-bit base, which needs the packed weights "
                f"stored in the compute dtype: set dtype and bnb_4bit_quant_storage to the same float dtype, e.g. "
                f"--dtype bfloat16 --bnb_4bit_quant_storage bfloat16 (now dtype={dtype!r}, "
                f"bnb_4bit_quant_storage={storage!r}); or use multi_gpu.yaml (DDP)"
            )
    if strategy.shards_weights and model_args.merge_adapters:
        raise RecipeError(
            f"merge_adapters under {strategy.name}: no process holds the whole base model to merge into; train "
            "without it and merge afterwards (AutoModel.from_pretrained(output_dir).merge_and_unload())"
        )
    if strategy.kind != "fsdp":
        return
    if bad := [name for name in strategy.fsdp_blocks if name in UNSHARDABLE_BLOCKS]:
        raise RecipeError(
            f"fsdp_transformer_layer_cls_to_wrap names {bad}: pi0.5's joint attention reads these layers' weights "
            "without calling them, so FSDP cannot gather them; drop the setting to use the family's fsdp_blocks"
        )
    if strategy.fsdp_activation_checkpointing and training_args.gradient_checkpointing:
        raise RecipeError(
            "fsdp_activation_checkpointing (accelerate config) and gradient_checkpointing (recipe) are both on; "
            "keep one: --gradient_checkpointing false, or fsdp_activation_checkpointing: false"
        )


def use_fsdp_blocks(trainer: Trainer, model: PreTrainedModel) -> None:
    """Hand the family's ``fsdp_blocks`` (the modules that become FSDP2 units, instead of accelerate's default: the
    model's ``_no_split_modules``) to accelerate's FSDP plugin, unless the accelerate config names its own."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy:
        plugin.transformer_cls_names_to_wrap = list(get_family(model.config.model_type).fsdp_blocks)


def save_full_weights(trainer: Trainer) -> None:
    """Make the final ``save_model`` write full safetensors weights under FSDP.

    With SHARDED_STATE_DICT (right for checkpoints: fast, one shard per rank) ``Trainer.save_model`` writes no
    weights at all into the output folder; FULL_STATE_DICT gathers them on rank 0. ZeRO-3 gathers through
    ``zero3_save_16bit_model`` in the accelerate config instead.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def end_training(trainer: Trainer) -> None:
    """Close a (possibly multi-process) run so that every process exits.

    Gloo's worker threads free finished collectives on their own thread, which needs the GIL when
    the collective holds Python-owned tensors. If the process group dies inside DDP's C++ reducer
    (which joins those threads while holding the GIL) or only at interpreter exit, a 2-process run
    can hang at the end or abort with "terminate called without an active exception". Dropping the
    DDP/FSDP wrapper first and destroying the group through accelerate lets the threads finish
    while the GIL is free.
    """
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    accelerator.end_training()
