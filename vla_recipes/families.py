"""What ``recipes/sft.py`` needs to know per model family, keyed by ``config.model_type``.

Each family says which fine-tuning modes and normalisation it uses by default, how to build its
processor for a randomly initialised model, and how to assemble its collator and trainer. Adding a
family means adding one class here; the training script does not change.
"""

from __future__ import annotations

from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig

from vla_recipes.configs import DataArguments, ModelArguments, RecipeError
from vla_recipes.trainers.base import VLATrainer


class Family:
    model_type: str
    supported_modes: tuple[str, ...] = ("full", "lora", "qlora")
    default_norm_mode: str

    def default_action_norm_mask(self, action_dim: int) -> list[bool] | None:
        return None

    def build_processor(self, config: PretrainedConfig, model_args: ModelArguments):
        """The processor: saved with a pretrained model, built from the config for a random one."""
        if model_args.model_name_or_path is not None:
            return AutoProcessor.from_pretrained(
                model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
        return self.new_processor(config, model_args.tokenizer_name_or_path)

    def new_processor(self, config: PretrainedConfig, tokenizer_name_or_path: str | None):
        raise NotImplementedError

    def configure(self, config: PretrainedConfig, data_args: DataArguments, camera_keys: list[str], **fields) -> None:
        """Write what the model must remember about the data into its config (saved with the weights)."""
        for key, value in dict(camera_keys=camera_keys, action_horizon=data_args.action_horizon, **fields).items():
            setattr(config, key, value)

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        raise NotImplementedError

    def inference_inputs(self, processor, samples: list[dict]) -> dict:
        """``processor`` outputs for ``VLADataset`` samples, as a user would call it at inference."""
        raise NotImplementedError


class OpenVLAFamily(Family):
    model_type = "openvla"
    default_norm_mode = "bounds_q99"

    def default_action_norm_mask(self, action_dim: int) -> list[bool]:
        """OpenVLA's EEF_POS mask: every dim but the last (the gripper) is normalised."""
        return [True] * (action_dim - 1) + [False]

    def new_processor(self, config, tokenizer_name_or_path):
        from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
        from vla_recipes.models.openvla import OpenVLAImageProcessor, OpenVLAProcessor

        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_name_or_path)
            if tokenizer_name_or_path
            else build_llama_like_tokenizer(config.n_action_bins)
        )
        return OpenVLAProcessor(image_processor=OpenVLAImageProcessor.for_model(config), tokenizer=tokenizer)

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        if len(camera_keys) != 1:
            raise RecipeError(f"OpenVLA sees one camera; camera_keys has {len(camera_keys)}: {camera_keys}")
        super().configure(config, data_args, camera_keys, **fields)

    def inference_inputs(self, processor, samples: list[dict]) -> dict:
        return processor(images=[s["images"][0] for s in samples], text=[s["task"] for s in samples])

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        from vla_recipes.data.collators import OpenVLADataCollator
        from vla_recipes.data.normalize import select_stats
        from vla_recipes.models.openvla import ActionTokenizer
        from vla_recipes.trainers.openvla import OpenVLATrainer

        config = model.config
        action_tokenizer = ActionTokenizer(processor.tokenizer, bins=config.n_action_bins)
        expected = config.text_config.vocab_size - config.pad_to_multiple_of
        if action_tokenizer.vocab_size != expected:
            raise RecipeError(
                f"the tokenizer's vocab_size ({action_tokenizer.vocab_size}) does not match the model's "
                f"text_config.vocab_size - pad_to_multiple_of ({expected}): action tokens would be misread"
            )
        collator = OpenVLADataCollator(
            processor=processor,
            action_tokenizer=action_tokenizer,
            action_stats=select_stats(config.norm_stats, None)["action"],
            norm_mode=config.norm_mode,
        )
        return OpenVLATrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
            action_tokenizer=action_tokenizer,
        )


FAMILIES: dict[str, Family] = {family.model_type: family for family in (OpenVLAFamily(),)}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise RecipeError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
