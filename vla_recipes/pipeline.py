"""The fine-tuning pipeline: recipe -> dataset checks -> statistics -> config -> model + mode -> data -> trainer ->
train -> save / push. ``recipes/sft.py`` and ``vla-recipes sft`` parse a recipe and call :func:`run`; a notebook
calls :func:`finetune` with a model, a dataset and (optionally) PEFT / bitsandbytes configs::

    from peft import LoraConfig
    from vla_recipes.pipeline import finetune

    result = finetune("openvla/openvla-7b", "lerobot/libero_spatial_image",
                      {"output_dir": "outputs/libero-lora", "max_steps": 5000}, peft_config=LoraConfig(r=32))

Every check that can fail runs before the weights load, in this order, so a bad recipe costs seconds.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from transformers import BitsAndBytesConfig, PretrainedConfig, set_seed
from transformers.trainer_utils import TrainOutput

from vla_recipes.checkpointing import check_optimizer_state, check_resume_recipe, resolve_resume, run_recipe
from vla_recipes.configs import ADAPTER_MODES, DataArguments, ModelArguments, RecipeError, VLATrainingArguments
from vla_recipes.data.run_data import check_mixture_dims, eval_data, prepare_entries, training_data
from vla_recipes.distributed import check_strategy, end_training, save_full_weights, use_fsdp_blocks
from vla_recipes.families import get_family
from vla_recipes.finetuning import (
    apply_finetune_mode,
    check_finetune_mode,
    check_lora_targets,
    check_model_type,
    load_config,
    load_model,
)
from vla_recipes.hub import check_push_to_hub, save_for_inference
from vla_recipes.output_dir import OutputDirClaim, claim_output_dir

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a run leaves: the trainer (its model, processor and log history), the training output and the
    evaluation metrics (empty without eval episodes)."""

    trainer: Any
    train_output: TrainOutput
    eval_metrics: dict[str, float]


def run(model_args: ModelArguments, data_args: DataArguments, training_args: VLATrainingArguments) -> FinetuneResult:
    """Run a parsed recipe: claim ``output_dir`` (one run at a time; a failed start leaves nothing there), seed,
    train, save."""
    set_seed(training_args.seed)
    with claim_output_dir(training_args) as claim:
        return train(model_args, data_args, training_args, claim)


def finetune(
    model: str | dict | PretrainedConfig | ModelArguments,
    dataset: str | list[dict] | DataArguments,
    args: VLATrainingArguments | dict | None = None,
    *,
    peft_config=None,
    quantization_config: BitsAndBytesConfig | None = None,
    **model_kwargs,
) -> FinetuneResult:
    """Fine-tune from Python: the recipe's three argument groups built from what a notebook has at hand.

    ``model``: a Hub id or folder, a config (a ``PretrainedConfig`` or a dict with ``model_type``: random init)
    or ``ModelArguments``; ``model_kwargs`` are further ``ModelArguments`` fields (``model_type``, ``dtype``,
    ``finetune_mode``, ...). ``dataset``: a LeRobot repo id, a mixture (a list of entries as the recipe's
    ``datasets``) or ``DataArguments``. ``args``: ``VLATrainingArguments`` or a dict of its fields.
    ``peft_config`` (a ``peft.LoraConfig``) makes it LoRA, with ``quantization_config`` (4-bit
    ``BitsAndBytesConfig``) QLoRA: their values become the recipe's keys, so ``recipe.json`` and resume see them.
    """
    fields = model_kwargs | _adapter_fields(peft_config, quantization_config)
    if "finetune_mode" in fields:  # the mode decides TRL's use_peft / load_in_4bit, derived from it
        fields = {"use_peft": False, "load_in_4bit": False} | fields
    base = dataclasses.asdict(model) if isinstance(model, ModelArguments) else _model_source(model)
    model_args = ModelArguments(**(base | fields))
    if isinstance(dataset, DataArguments):
        data_args = dataset
    elif isinstance(dataset, list):
        data_args = DataArguments(datasets=dataset)
    else:
        data_args = DataArguments(dataset_repo_id=dataset)
    training_args = args if isinstance(args, VLATrainingArguments) else VLATrainingArguments(**(args or {}))
    return run(model_args, data_args, training_args)


def _model_source(model: str | dict | PretrainedConfig) -> dict:
    if isinstance(model, str):
        return {"model_name_or_path": model}
    if isinstance(model, PretrainedConfig):
        return {"model_config": model.to_diff_dict()}
    return {"model_config": model}


def _adapter_fields(peft_config, quantization_config: BitsAndBytesConfig | None) -> dict:
    """The ``ModelArguments`` fields a ``LoraConfig`` and a 4-bit ``BitsAndBytesConfig`` set; a setting the recipe
    has no key for is refused rather than dropped."""
    if quantization_config is not None and peft_config is None:
        raise RecipeError("quantization_config without peft_config: a 4-bit base trains only through LoRA (QLoRA)")
    if peft_config is None:
        return {}
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise RecipeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
    mapped = {
        "r": "lora_r",
        "lora_alpha": "lora_alpha",
        "lora_dropout": "lora_dropout",
        "target_modules": "lora_target_modules",
        "init_lora_weights": "lora_init_weights",
        "modules_to_save": "lora_modules_to_save",
        "target_parameters": "lora_target_parameters",
        "task_type": "lora_task_type",
        "use_rslora": "use_rslora",
        "use_dora": "use_dora",
    }
    default = LoraConfig()
    if unmapped := [
        f.name
        for f in dataclasses.fields(LoraConfig)
        if f.init and f.name not in mapped and getattr(peft_config, f.name) != getattr(default, f.name)
    ]:
        raise RecipeError(f"peft_config sets {', '.join(unmapped)}, which the recipe has no key for; leave them unset")
    fields = {key: getattr(peft_config, name) for name, key in mapped.items()}
    if isinstance(fields["lora_target_modules"], set):  # LoraConfig keeps a list of names as a set
        fields["lora_target_modules"] = sorted(fields["lora_target_modules"])
    init = fields["lora_init_weights"]
    fields["lora_init_weights"] = str(init).lower() if isinstance(init, bool) else init
    fields["finetune_mode"] = "lora"
    if quantization_config is not None:
        if not quantization_config.load_in_4bit:
            raise RecipeError("quantization_config must be 4-bit (load_in_4bit=True): QLoRA; 8-bit is not supported")
        storage = quantization_config.bnb_4bit_quant_storage
        fields |= {
            "finetune_mode": "qlora",
            "bnb_4bit_quant_type": quantization_config.bnb_4bit_quant_type,
            "use_bnb_nested_quant": quantization_config.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": None if storage is None else str(storage).removeprefix("torch."),
        }
    return fields


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VLATrainingArguments,
    claim: OutputDirClaim,
) -> FinetuneResult:
    """The run inside a claimed ``output_dir``: checks and statistics first, then the weights, training, saving."""
    # Checks first: recipe, resume, dataset features, statistics. Nothing heavy has been loaded yet.
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    config = load_config(model_args)
    if model_args.model_type is not None:  # e.g. OpenVLA-OFT starting from openvla/openvla-7b
        config = get_family(model_args.model_type).adopt_config(config)
    check_model_type(model_args, config)
    recipe = run_recipe(model_args, data_args, training_args, config.model_type)
    if resume is not None:
        check_optimizer_state(resume)
        check_resume_recipe(resume, recipe)  # another model, other batches or data: before any weight loads
    family = get_family(config.model_type)
    check_finetune_mode(model_args, family.supported_modes)
    check_lora_targets(model_args, config, family.model_class)
    check_strategy(model_args, training_args)  # what the accelerate config (DDP / FSDP / ZeRO) cannot run
    norm_mode = data_args.norm_mode or family.default_norm_mode(config)
    entries = prepare_entries(data_args, family, norm_mode)  # each dataset's checks and statistics
    first, default = next(iter(entries.values())), max(entries, key=lambda name: entries[name].weight)
    check_mixture_dims(entries)  # one action / state layout for the model
    slots = max((e.camera_keys for e in entries.values()), key=len)  # the model's camera slots
    mixture = data_args.datasets is not None
    norm_stats = {
        name: e.norm_stats | ({"state_indices": e.state_indices} if mixture else {}) for name, e in entries.items()
    }
    family.configure(
        config, data_args, slots, action_dim=first.action_dim, norm_mode=norm_mode, norm_stats=norm_stats,
        state_dim=first.state_dim, state_indices=entries[default].state_indices,
        relative_action_mask=first.relative_mask, default_unnorm_key=default if mixture else None,
    )  # fmt: skip

    check_push_to_hub(training_args)  # a run that cannot push fails now, not after training
    processor = family.build_processor(config, model_args)
    family.check_prompts(processor, config, sorted({t for e in entries.values() for t in e.tasks}))  # prompts fit
    claim.replace_previous_run(resume)  # overwrite_output_dir: the previous run goes, checkpoints included
    model = load_model(model_args, config, family.model_class, training_args.output_dir)
    model = apply_finetune_mode(
        model, model_args, training_args.gradient_checkpointing, modules_to_save=family.modules_to_save(model)
    )
    if model_args.finetune_mode in ADAPTER_MODES:
        model.print_trainable_parameters()

    frame_resize = family.frame_resize_for(config)  # the processor's first step, done once in the frame cache
    trainer = family.make_trainer(
        model=model,
        args=training_args,
        processor=processor,
        train_dataset=training_data(entries, data_args, training_args.seed, frame_resize, mixture),
        eval_dataset=eval_data(entries, frame_resize, mixture),
    )
    use_fsdp_blocks(trainer, model)
    for name, e in entries.items():
        logger.info(
            "training %s (%s) on %s%s: %d train / %d eval episodes, norm_mode=%s",
            family.model_type,
            model_args.finetune_mode,
            name,
            f" (weight {e.weight:g})" if mixture else "",
            len(e.train_episodes),
            len(e.eval_episodes or []),
            norm_mode,
        )
    trainer.recipe = recipe
    claim.training_started = True
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    save_full_weights(trainer)
    save_for_inference(trainer, model_args)
    end_training(trainer)
    return FinetuneResult(trainer, result, metrics)
