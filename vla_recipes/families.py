"""What ``recipes/sft.py`` needs to know per model family, keyed by ``config.model_type``.

Each family says which fine-tuning modes and normalisation it uses by default, how to build its
processor for a randomly initialised model, and how to assemble its collator and trainer. Adding a
family means adding one class here; the training script does not change.
"""

from __future__ import annotations

from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import PROCESSOR_NAME, cached_file

from vla_recipes.configs import DataArguments, ModelArguments, RecipeError
from vla_recipes.trainers.base import VLATrainer


class Family:
    model_type: str
    supported_modes: tuple[str, ...] = ("full", "lora", "qlora")
    # Actions come from generated LM tokens (``generate_action_ids`` + ``actions_from_ids``): evaluation scores them.
    decodes_action_tokens: bool = False

    @property
    def model_class(self) -> type[PreTrainedModel]:
        raise NotImplementedError

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        raise NotImplementedError

    def default_action_norm_mask(self, action_dim: int) -> list[bool] | None:
        return None

    def adopt_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The config to train from a model folder of another family (e.g. OpenVLA-OFT from openvla-7b); by default
        the folder's own config, which ``check_model_type`` then compares with the recipe."""
        return config

    def modules_to_save(self, model: PreTrainedModel) -> list[str] | None:
        """Modules trained in full next to LoRA adapters (new heads a LoRA cannot express)."""
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

    def configure(
        self,
        config: PretrainedConfig,
        data_args: DataArguments,
        camera_keys: list[str],
        *,
        action_dim: int,
        state_dim: int | None,
        norm_mode: str,
        norm_stats: dict,
        state_indices: list[int] | None = None,
        relative_action_mask: list[bool] | None = None,
        default_unnorm_key: str | None = None,
    ) -> None:
        """Write what the model must remember about the data into its config (saved with the weights).
        ``state_indices``: the dims of the dataset's state the model sees (None: all); the processor takes those.
        ``relative_action_mask``: the action dims trained relative to the state (None: absolute actions).
        ``default_unnorm_key``: a mixture's heaviest dataset, whose statistics inference uses by default."""
        config.camera_keys, config.action_horizon, config.action_dim = camera_keys, data_args.action_horizon, action_dim
        config.state_indices = state_indices
        config.relative_action_mask = relative_action_mask
        config.default_unnorm_key = default_unnorm_key
        config.norm_mode, config.norm_stats = norm_mode, norm_stats

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        raise NotImplementedError

    def check_prompts(self, processor, config: PretrainedConfig, tasks: list[str]) -> None:
        """Refuse, before the weights load, a task whose prompt does not fit the model's sequence."""
        raise NotImplementedError

    @staticmethod
    def _too_long(task: str, tokens: int, limit: str, fix: str) -> RecipeError:
        shown = task if len(task) <= 60 else f"{task[:57]}..."
        return RecipeError(f"the prompt of the dataset task {shown!r} takes {tokens} tokens, more than {limit}; {fix}")


class OpenVLAFamily(Family):
    model_type = "openvla"
    decodes_action_tokens = True

    @property
    def model_class(self) -> type[PreTrainedModel]:
        from vla_recipes.models.openvla import OpenVLAForActionPrediction

        return OpenVLAForActionPrediction

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        return "bounds_q99"

    def default_action_norm_mask(self, action_dim: int) -> list[bool]:
        """OpenVLA's EEF_POS mask: every dim but the last (the gripper) is normalised."""
        return [True] * (action_dim - 1) + [False]

    def build_processor(self, config, model_args):
        """Ours, also from the published openvla/openvla-7b layout (whose processor files name remote code)."""
        if model_args.model_name_or_path is None:
            return self.new_processor(config, model_args.tokenizer_name_or_path)
        from vla_recipes.models.openvla import OpenVLAProcessor

        return OpenVLAProcessor.from_pretrained(model_args.model_name_or_path)

    def new_processor(self, config, tokenizer_name_or_path):
        from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
        from vla_recipes.models.openvla import OpenVLAProcessor

        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_name_or_path)
            if tokenizer_name_or_path
            else build_llama_like_tokenizer(
                config.n_action_bins, vocab_size=config.text_config.vocab_size - config.pad_to_multiple_of
            )
        )
        return OpenVLAProcessor.from_model_config(config, tokenizer)

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """OpenVLA sees one image and no state (so no relative actions: there is no state to add back)."""
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
        from vla_recipes.models.openvla.processing_openvla import build_prompt

        positions = config.text_config.max_position_embeddings
        fixed = self.tokens_beside_prompt(config)
        for task in tasks:
            tokens = len(processor.tokenizer(build_prompt(task))["input_ids"]) + fixed
            if tokens > positions:
                limit = f"the language model's max_position_embeddings={positions} (with {self.beside_prompt})"
                raise self._too_long(task, tokens, limit, "shorten the task, or lower action_horizon")

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        from vla_recipes.data.collators import VLADataCollator
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
        processor.set_model_config(config)  # the run's statistics
        collator = VLADataCollator(processor)
        return OpenVLATrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
            action_tokenizer=action_tokenizer,
        )


class OpenVLAOFTFamily(OpenVLAFamily):
    """OpenVLA-OFT: OpenVLA's backbone and prompt, several cameras, the robot state (optional), action chunks
    decoded in parallel and regressed with an L1 loss. It starts from an OpenVLA model (openvla/openvla-7b) too."""

    model_type = "openvla_oft"
    decodes_action_tokens = False

    @property
    def model_class(self) -> type[PreTrainedModel]:
        from vla_recipes.models.openvla_oft import OpenVLAOFTForActionPrediction

        return OpenVLAOFTForActionPrediction

    def adopt_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """An OpenVLA model's config becomes an OFT one (same backbone; the head is new)."""
        from vla_recipes.models.openvla_oft import OpenVLAOFTConfig

        return OpenVLAOFTConfig.from_openvla(config) if config.model_type == OpenVLAFamily.model_type else config

    def modules_to_save(self, model: PreTrainedModel) -> list[str]:
        """The action head and proprio projector are new: trained in full next to the LoRA, as OFT does."""
        return ["action_head"] + (["proprio_projector"] if model.proprio_projector is not None else [])

    def build_processor(self, config, model_args):
        from vla_recipes.models.openvla_oft import OpenVLAOFTProcessor

        if model_args.model_name_or_path is None:
            return self.new_processor(config, model_args.tokenizer_name_or_path)
        return OpenVLAOFTProcessor.from_pretrained(model_args.model_name_or_path)

    def new_processor(self, config, tokenizer_name_or_path):
        from vla_recipes.models.openvla_oft import OpenVLAOFTProcessor

        tokenizer = super().new_processor(config, tokenizer_name_or_path).tokenizer
        return OpenVLAOFTProcessor.from_model_config(config, tokenizer)

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """Every camera goes through the fused backbone; the state (when ``state_key`` is set) is one token."""
        config.num_images, config.state_dim = len(camera_keys), fields["state_dim"]
        Family.configure(self, config, data_args, camera_keys, **fields)

    beside_prompt = "the images and actions"

    def tokens_beside_prompt(self, config) -> int:
        """Every camera's patches, the proprio token and the action placeholders."""
        return config.num_images * config.num_patches + (1 if config.state_dim else 0) + config.num_action_tokens

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        from vla_recipes.data.collators import VLADataCollator
        from vla_recipes.trainers.openvla_oft import OpenVLAOFTTrainer

        processor.set_model_config(model.config)  # the run's statistics (a mixture's samples each use theirs)
        collator = VLADataCollator(processor)
        return OpenVLAOFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
        )


class Pi05Family(Family):
    """pi0.5 and pi0 (``config.pi05`` False): flow matching on action chunks, several cameras."""

    model_type = "pi05"
    supported_modes = ("full", "expert_only", "lora", "qlora")
    # LeRobot folders (lerobot/pi05_base) carry no tokenizer: theirs is PaliGemma's.
    default_tokenizer = "google/paligemma-3b-pt-224"

    @property
    def model_class(self) -> type[PreTrainedModel]:
        from vla_recipes.models.pi05 import Pi05ForActionPrediction

        return Pi05ForActionPrediction

    def default_norm_mode(self, config: PretrainedConfig) -> str:
        return "quantiles" if config.pi05 else "mean_std"

    def modules_to_save(self, model: PreTrainedModel) -> list[str]:
        return model.action_head_modules()

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """Real action / state dims must fit the model's padded ones; pi0.5 needs a state for its prompt."""
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
        from vla_recipes.models.char_tokenizer import build_gemma_like_tokenizer
        from vla_recipes.models.pi05 import Pi05Processor

        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_name_or_path)
            if tokenizer_name_or_path
            else build_gemma_like_tokenizer()
        )
        return Pi05Processor.from_model_config(config, tokenizer)

    def check_prompts(self, processor, config, tasks: list[str]) -> None:
        """The processor refuses a prompt over ``tokenizer_max_length`` (cut, it would lose the state and the
        "Action:" suffix); here every task is tried with the longest state text (three digits per dim)."""
        import numpy as np

        from vla_recipes.models.pi05.processing_pi05 import pi05_prompt

        bins = np.full(config.state_dim or 0, 255)
        for task in tasks:
            prompt = pi05_prompt(task, bins) if processor.pi05 else f"{task}\n"
            tokens = len(processor.tokenizer(prompt)["input_ids"])
            if tokens > processor.max_length:
                limit = f"the model's tokenizer_max_length={processor.max_length}"
                raise self._too_long(task, tokens, limit, "shorten the task, or raise tokenizer_max_length")

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset) -> VLATrainer:
        from functools import partial

        from vla_recipes.data.collators import VLADataCollator
        from vla_recipes.models.pi05.flow_matching import seeded_noise_and_time
        from vla_recipes.trainers.flow_matching import FlowMatchingTrainer

        processor.set_model_config(model.config)  # the run's statistics
        collator = VLADataCollator(processor, seeded_draws=partial(seeded_noise_and_time, model.config))
        return FlowMatchingTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
        )


FAMILIES: dict[str, Family] = {
    family.model_type: family for family in (OpenVLAFamily(), OpenVLAOFTFamily(), Pi05Family())
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise RecipeError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
