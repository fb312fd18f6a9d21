"""OpenVLA's family declaration: actions as LM tokens, one camera, no state (see :mod:`vla_recipes.families`)."""

from __future__ import annotations

from transformers import PretrainedConfig

from vla_recipes.families import Family, register_family

from ..char_tokenizer import build_llama_like_tokenizer
from .action_tokenizer import ActionTokenizer
from .configuration_openvla import TINY_OPENVLA_CONFIG, OpenVLAConfig
from .modeling_openvla import OpenVLAForActionPrediction
from .processing_openvla import OpenVLAImageProcessor, OpenVLAProcessor, build_prompt


@register_family
class OpenVLAFamily(Family):
    model_type = OpenVLAConfig.model_type
    config_class = OpenVLAConfig
    model_class = OpenVLAForActionPrediction
    processor_class = OpenVLAProcessor
    image_processor_class = OpenVLAImageProcessor
    # OpenVLA's class attribute names only the vision blocks and the projector (transformers >= 5 adds the Llama
    # decoder layers from the language model at init; naming them here keeps the ~95% of the 7B that they hold
    # sharded layer by layer whatever the version).
    fsdp_blocks = ("LlamaDecoderLayer", "Block", "OpenVLAProjector")
    frame_resize = "square_bicubic"
    tiny_config = TINY_OPENVLA_CONFIG
    decodes_action_tokens = True

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        return "bounds_q99"

    def default_action_norm_mask(self, action_dim: int) -> list[bool]:
        """OpenVLA's EEF_POS mask: every dim but the last (the gripper) is normalised."""
        return [True] * (action_dim - 1) + [False]

    def offline_tokenizer(self, config: PretrainedConfig):
        """Llama's layout, spanning the model's vocabulary so the action bins are its last ids."""
        return build_llama_like_tokenizer(
            config.n_action_bins, vocab_size=config.text_config.vocab_size - config.pad_to_multiple_of
        )

    def build_processor(self, config, model_args):
        """Ours, also from the published openvla/openvla-7b layout (whose processor files name remote code)."""
        if model_args.model_name_or_path is None:
            return self.new_processor(config, model_args.tokenizer_name_or_path)
        return self.processor_class.from_pretrained(model_args.model_name_or_path)

    def new_processor(self, config, tokenizer_name_or_path):
        return OpenVLAProcessor.from_model_config(config, self.tokenizer(config, tokenizer_name_or_path))

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """OpenVLA sees one image and no state (so no relative actions: there is no state to add back)."""
        from vla_recipes.configs import RecipeError

        if len(camera_keys) != 1:
            raise RecipeError(f"OpenVLA sees one camera; camera_keys has {len(camera_keys)}: {camera_keys}")
        if fields.get("relative_action_mask") is not None:
            raise RecipeError(
                "relative_actions: OpenVLA sees no robot state, so its actions cannot be made relative to it (nor "
                "turned back at inference); drop relative_actions, or train pi0.5 / pi0"
            )
        super().configure(config, data_args, camera_keys, **fields)

    beside_prompt = "the image and actions"  # what else the sequence holds, for the error

    def tokens_beside_prompt(self, config) -> int:
        """BOS's neighbours in the sequence: the image patches before the prompt, the action tokens and EOS after."""
        return config.num_patches + config.action_horizon * config.action_dim + 1

    def check_prompts(self, processor, config, tasks: list[str]) -> None:
        """Each task's prompt and :meth:`tokens_beside_prompt` must fit the language model's
        ``max_position_embeddings``: past it, its rotary positions are ones it was never trained on."""
        positions = config.text_config.max_position_embeddings
        fixed = self.tokens_beside_prompt(config)
        for task in tasks:
            tokens = len(processor.tokenizer(build_prompt(task))["input_ids"]) + fixed
            if tokens > positions:
                limit = f"the language model's max_position_embeddings={positions} (with {self.beside_prompt})"
                raise self._too_long(task, tokens, limit, "shorten the task, or lower action_horizon")

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset):
        from vla_recipes.configs import RecipeError

        from .trainer import OpenVLATrainer

        config = model.config
        action_tokenizer = ActionTokenizer(processor.tokenizer, bins=config.n_action_bins)
        expected = config.text_config.vocab_size - config.pad_to_multiple_of
        if action_tokenizer.vocab_size != expected:
            raise RecipeError(
                f"the tokenizer's vocab_size ({action_tokenizer.vocab_size}) does not match the model's "
                f"text_config.vocab_size - pad_to_multiple_of ({expected}): action tokens would be misread"
            )
        return self.trainer_with_collator(
            OpenVLATrainer,
            model=model,
            args=args,
            processor=processor,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            action_tokenizer=action_tokenizer,
        )
