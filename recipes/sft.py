"""Fine-tune a VLA policy (OpenVLA, pi0.5) on a LeRobot dataset.

    accelerate launch recipes/sft.py --config recipes/demo/openvla.yaml [--any_field value ...]

The recipe YAML chooses the model, the dataset and the fine-tuning mode; the accelerate config
chooses the hardware strategy. Every check that can fail runs before the weights are loaded.
"""

from __future__ import annotations

import logging
import sys

import transformers
from transformers import set_seed

from vla_recipes.checkpointing import check_optimizer_state, check_resume_recipe, resolve_resume, run_recipe
from vla_recipes.configs import RecipeError, parse_recipe
from vla_recipes.data.frame_cache import frame_resize_for
from vla_recipes.data.run_data import check_mixture_dims, eval_data, prepare_entries, training_data
from vla_recipes.distributed import check_strategy, end_training, save_full_weights, use_fsdp_blocks
from vla_recipes.families import get_family
from vla_recipes.finetuning import (
    ADAPTER_MODES,
    apply_finetune_mode,
    check_finetune_mode,
    check_lora_targets,
    check_model_type,
    load_config,
    load_model,
)
from vla_recipes.hub import check_push_to_hub, save_for_inference
from vla_recipes.output_dir import OutputDirClaim, claim_output_dir

logger = logging.getLogger("vla_recipes.sft")


def main(args: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_recipe(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    # One run at a time in output_dir (a lock the OS drops with the process); a failed start leaves nothing there.
    with claim_output_dir(training_args) as claim:
        train(model_args, data_args, training_args, claim)


def train(model_args, data_args, training_args, claim: OutputDirClaim) -> None:
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

    frame_resize = frame_resize_for(config)  # the processor's first step, done once in the frame cache
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
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    save_full_weights(trainer)
    save_for_inference(trainer, model_args)
    end_training(trainer)


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        sys.exit(f"error: {e}")
