"""pi0.5 and pi0's family declaration (``config.pi05`` False: pi0): flow matching on action chunks, several
cameras, the robot state; reads LeRobot's ``pi05`` / ``pi0`` policy folders (see :mod:`vla_recipes.families`)."""

from __future__ import annotations

import numpy as np
from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel
from transformers.utils import PROCESSOR_NAME, cached_file

from vla_recipes.families import Family, register_family

from ..char_tokenizer import build_gemma_like_tokenizer
from .configuration_pi05 import TINY_PI05_CONFIG, Pi05Config
from .image_processing_pi05 import Pi05ImageProcessor
from .modeling_pi05 import Pi05ForActionPrediction
from .processing_pi05 import Pi05Processor, pi05_prompt


@register_family
class Pi05Family(Family):
    model_type = Pi05Config.model_type
    config_class = Pi05Config
    model_class = Pi05ForActionPrediction
    processor_class = Pi05Processor
    image_processor_class = Pi05ImageProcessor
    # Not GemmaDecoderLayer (the model's _no_split_modules): the joint VLM + expert attention reads its weights
    # without calling the layer, so FSDP2 never gathers them ("got mixed torch.Tensor and DTensor"); the Gemma
    # layers stay in the root unit.
    fsdp_blocks = ("SiglipEncoderLayer",)
    frame_resize = "fit_bilinear"
    tiny_config = TINY_PI05_CONFIG
    lerobot_policy_types = ("pi05", "pi0")
    supported_modes = ("full", "expert_only", "lora", "qlora")
    # LeRobot folders (lerobot/pi05_base) carry no tokenizer: theirs is PaliGemma's.
    default_tokenizer = "google/paligemma-3b-pt-224"

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        return "quantiles" if config.pi05 else "mean_std"

    def takes_state(self, config: PretrainedConfig) -> bool:
        return True  # pi0.5 writes it into the prompt, pi0 projects it

    def modules_to_save(self, model: PreTrainedModel) -> list[str]:
        return model.action_head_modules()

    def offline_tokenizer(self, config: PretrainedConfig):
        """PaliGemma's special ids, characters for the rest."""
        return build_gemma_like_tokenizer()

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """Real action / state dims must fit the model's padded ones; pi0.5 needs a state for its prompt."""
        from vla_recipes.configs import RecipeError

        for name, key, limit in (
            ("action", data_args.action_key, "max_action_dim"),
            ("state", data_args.state_key, "max_state_dim"),
        ):
            dim = fields[f"{name}_dim"]
            if dim is None:
                raise RecipeError("pi0.5 / pi0 need a robot state: set state_key (the dataset's state feature)")
            if dim > getattr(config, limit):
                raise RecipeError(
                    f"the dataset's {key!r} has {dim} dims, more than the model's {limit}={getattr(config, limit)}"
                    + ("; select the dims the model sees with state_indices" if name == "state" else "")
                )
        config.state_dim = fields["state_dim"]
        super().configure(config, data_args, camera_keys, **fields)

    def build_processor(self, config, model_args):
        """A saved processor when the model folder has one (ours); else one built for the config (LeRobot folders)."""
        path = model_args.model_name_or_path
        has_processor = path is not None and cached_file(
            path, PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False
        )
        if has_processor:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
            processor.set_model_config(config)  # the run's statistics and cameras, not the base model's
            return processor
        tokenizer = model_args.tokenizer_name_or_path or (self.default_tokenizer if path is not None else None)
        return self.new_processor(config, tokenizer)

    def new_processor(self, config, tokenizer_name_or_path):
        return Pi05Processor.from_model_config(config, self.tokenizer(config, tokenizer_name_or_path))

    def check_prompts(self, processor, config, tasks: list[str]) -> None:
        """The processor refuses a prompt over ``tokenizer_max_length`` (cut, it would lose the state and the
        "Action:" suffix); here every task is tried with the longest state text (three digits per dim)."""
        bins = np.full(config.state_dim or 0, 255)
        for task in tasks:
            prompt = pi05_prompt(task, bins) if processor.pi05 else f"{task}\n"
            tokens = len(processor.tokenizer(prompt)["input_ids"])
            if tokens > processor.max_length:
                limit = f"the model's tokenizer_max_length={processor.max_length}"
                raise self._too_long(task, tokens, limit, "shorten the task, or raise tokenizer_max_length")

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset):
        from functools import partial

        from vla_recipes.trainers.flow_matching import FlowMatchingTrainer

        from .flow_matching import seeded_noise_and_time

        return self.trainer_with_collator(
            FlowMatchingTrainer,
            model=model,
            args=args,
            processor=processor,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            seeded_draws=partial(seeded_noise_and_time, model.config),
        )
