"""OpenVLA-OFT's family declaration: OpenVLA's backbone and prompt, several cameras, the robot state (optional),
action chunks decoded in parallel and regressed with an L1 loss. It starts from an OpenVLA model too."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from vla_recipes.families import Family, register_family

from ..openvla import OpenVLAConfig, OpenVLAImageProcessor
from ..openvla.family import OpenVLAFamily
from .configuration_openvla_oft import TINY_OPENVLA_OFT_CONFIG, OpenVLAOFTConfig
from .modeling_openvla_oft import OpenVLAOFTForActionPrediction
from .processing_openvla_oft import OpenVLAOFTProcessor


@register_family
class OpenVLAOFTFamily(OpenVLAFamily):
    model_type = OpenVLAOFTConfig.model_type
    config_class = OpenVLAOFTConfig
    model_class = OpenVLAOFTForActionPrediction
    processor_class = OpenVLAOFTProcessor
    image_processor_class = OpenVLAImageProcessor
    fsdp_blocks = OpenVLAFamily.fsdp_blocks  # the small heads stay in the root unit
    tiny_config = TINY_OPENVLA_OFT_CONFIG
    decodes_action_tokens = False

    def adopt_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """An OpenVLA model's config becomes an OFT one (same backbone; the head is new)."""
        return OpenVLAOFTConfig.from_openvla(config) if config.model_type == OpenVLAConfig.model_type else config

    def modules_to_save(self, model: PreTrainedModel) -> list[str]:
        """The action head and proprio projector are new: trained in full next to the LoRA, as OFT does."""
        return ["action_head"] + (["proprio_projector"] if model.proprio_projector is not None else [])

    def new_processor(self, config, tokenizer_name_or_path):
        return OpenVLAOFTProcessor.from_model_config(config, self.tokenizer(config, tokenizer_name_or_path))

    def configure(self, config, data_args, camera_keys, **fields) -> None:
        """Every camera goes through the fused backbone; the state (when ``state_key`` is set) is one token."""
        config.num_images, config.state_dim = len(camera_keys), fields["state_dim"]
        Family.configure(self, config, data_args, camera_keys, **fields)

    beside_prompt = "the images and actions"

    def tokens_beside_prompt(self, config) -> int:
        """Every camera's patches, the proprio token and the action placeholders."""
        return config.num_images * config.num_patches + (1 if config.state_dim else 0) + config.num_action_tokens

    def make_trainer(self, *, model, args, processor, train_dataset, eval_dataset):
        from .trainer import OpenVLAOFTTrainer

        return self.trainer_with_collator(
            OpenVLAOFTTrainer,
            model=model,
            args=args,
            processor=processor,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )
