"""OpenVLA for transformers 5: timm ViT featurizer(s) -> MLP projector -> causal LM, actions as tokens.

The module tree reproduces openvla/openvla-7b's state dict key for key (``vision_backbone.featurizer.*``,
``vision_backbone.fused_featurizer.*``, ``projector.fc1..fc3``, ``language_model.*``), so its safetensors load
as they are. Image features are the patch tokens of each ViT's second-to-last block (no final norm); the
parameters that never take part (last block, final norm, SigLIP's attention pool) are kept for the layout
but frozen, so DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import LayerScale as TimmLayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...data.normalize import Normalizer
from ..adapters import AdapterFolderMixin
from .action_tokenizer import decode_action_ids
from .configuration_openvla import OpenVLAConfig

IGNORE_INDEX = -100


class LayerScale(nn.Module):
    """timm's LayerScale with the parameter named ``scale_factor``, the key openvla-7b stores."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.scale_factor = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def build_vit(vit_config: dict[str, Any]) -> VisionTransformer:
    """A headless timm ViT from ``VisionTransformer`` kwargs, LayerScales renamed to openvla's keys."""
    vit = VisionTransformer(**{**vit_config, "num_classes": 0})
    for block in vit.blocks:
        for name in ("ls1", "ls2"):
            layer_scale = getattr(block, name)
            if isinstance(layer_scale, TimmLayerScale):
                setattr(block, name, LayerScale(layer_scale.gamma.shape[0], layer_scale.init_values))
    return vit


def vit_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens after the second-to-last block, without the final norm: [B, num_patches, dim]."""
    (features,) = vit.forward_intermediates(
        images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
    )
    return features


class OpenVLAVisionBackbone(nn.Module):
    """DINOv2 (``featurizer``) and, when fused, SigLIP (``fused_featurizer``); features concatenated on channels."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.featurizer = build_vit(config.featurizer_config)
        self.fused_featurizer = build_vit(config.fused_featurizer_config) if config.use_fused_vision_backbone else None
        self.embed_dim = sum(vit.embed_dim for vit in self.vits())
        self.freeze_unused()

    def vits(self) -> list[VisionTransformer]:
        return [vit for vit in (self.featurizer, self.fused_featurizer) if vit is not None]

    def unused_module_names(self) -> list[str]:
        """Modules the features never pass through: last block, final norm, attention pool."""
        names = []
        for prefix in ("featurizer", "fused_featurizer"):
            vit = getattr(self, prefix)
            if vit is not None:
                names += [f"{prefix}.blocks.{len(vit.blocks) - 1}", f"{prefix}.norm"]
                names += [f"{prefix}.attn_pool"] if vit.attn_pool is not None else []
        return names

    def freeze_unused(self) -> None:
        """No gradients for the unused modules, so DDP finds no parameter without one."""
        for name in self.unused_module_names():
            self.get_submodule(name).requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return vit_features(self.featurizer, pixel_values)
        images, fused_images = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([vit_features(self.featurizer, images), vit_features(self.fused_featurizer, fused_images)], 2)


class OpenVLAProjector(nn.Module):
    """fc1 -> GELU -> fc2 [-> GELU -> fc3]: openvla's ``fused-gelu-mlp`` (fc1 widens 4x) or ``gelu-mlp``."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool) -> None:
        super().__init__()
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        layers = [self.fc1, self.fc2] + ([self.fc3] if hasattr(self, "fc3") else [])
        x = layers[0](patches)
        for layer in layers[1:]:
            x = layer(self.act(x))
        return x


def insert_after_bos(sequence: torch.Tensor, inserted: torch.Tensor) -> torch.Tensor:
    """``[seq[:, :1], inserted, seq[:, 1:]]``: where openvla puts the image tokens."""
    return torch.cat([sequence[:, :1], inserted, sequence[:, 1:]], dim=1)


class OpenVLAForActionPrediction(AdapterFolderMixin, PreTrainedModel):
    """OpenVLA: ``forward`` gives the LM loss on action tokens, ``predict_action`` batched un-normalised actions."""

    config: OpenVLAConfig
    config_class = OpenVLAConfig
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "OpenVLAProjector"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__(config)
        self.vision_backbone = OpenVLAVisionBackbone(config)
        self.projector = OpenVLAProjector(
            self.vision_backbone.embed_dim, config.text_config.hidden_size, config.use_fused_vision_backbone
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loading, then re-freeze the unused modules (loading makes fresh, trainable parameters)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).vision_backbone.freeze_unused()
        return loaded

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.featurizer.patch_embed.num_patches

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults plus the timm parameters it does not know (random init; fine-tuning loads weights)."""
        super()._init_weights(module)
        if isinstance(module, VisionTransformer):
            init.trunc_normal_(module.pos_embed, std=0.02)
            for token in (module.cls_token, module.reg_token):
                if token is not None:
                    init.normal_(token, std=1e-6)
        elif isinstance(module, AttentionPoolLatent):
            init.trunc_normal_(module.latent, std=module.latent_dim**-0.5)
        elif isinstance(module, LayerScale):
            init.constant_(module.scale_factor, module.init_values)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint) -> None:
        """The LM through transformers, the ViTs through timm's own switch."""
        super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func)
        for vit in self.vision_backbone.vits():
            vit.set_grad_checkpointing(enable)

    def lora_target_modules(self) -> list[str]:
        """PEFT ``target_modules``: every ``nn.Linear`` the forward uses, except ``lm_head`` (OpenVLA's all-linear)."""
        skipped = ["language_model.lm_head"]
        skipped += [f"vision_backbone.{name}" for name in self.vision_backbone.unused_module_names()]
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skipped)
        ]

    def _multimodal_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and attention mask with the projected image patches inserted right after BOS."""
        channels = 3 * len(self.vision_backbone.vits())
        if pixel_values is None or pixel_values.shape[1] != channels:
            got = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"OpenVLA needs pixel_values with {channels} channels (3 per vision backbone), got {got}; "
                "make them with OpenVLAImageProcessor.for_model(config)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_dtype = self.vision_backbone.featurizer.patch_embed.proj.weight.dtype
        patches = self.projector(self.vision_backbone(pixel_values.to(vision_dtype)))
        text_embeds = self.get_input_embeddings()(input_ids)
        embeds = insert_after_bos(text_embeds, patches.to(text_embeds.dtype))
        mask = insert_after_bos(attention_mask, attention_mask.new_ones(patches.shape[:2]))
        return embeds, mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits over the whole multimodal sequence (``num_patches`` longer than ``input_ids``); with ``labels``
        the shifted cross-entropy over labels != -100, summed and divided by ``num_items_in_batch`` when given
        (so gradient accumulation equals one big batch), else averaged."""
        embeds, mask = self._multimodal_inputs(input_ids, attention_mask, pixel_values)
        self._check_positions(embeds.shape[1])
        kwargs.setdefault("use_cache", False)
        outputs = self.language_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        loss = None
        if labels is not None:
            labels = insert_after_bos(labels, labels.new_full((labels.shape[0], self.num_patches), IGNORE_INDEX))
            loss = ForCausalLMLoss(
                outputs.logits, labels, vocab_size=outputs.logits.shape[-1], num_items_in_batch=num_items_in_batch
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate_action_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy ``action_horizon * action_dim`` action tokens per row: [B, H * D].

        Rows come right-padded from the processor; they are left-aligned (valid tokens last) so every row's
        next token follows its own prompt, which makes a batch give what one-by-one calls give.
        """
        embeds, mask = self._multimodal_inputs(input_ids, attention_mask, pixel_values)
        order = torch.argsort(mask.int(), dim=1, stable=True)
        embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
        mask = mask.gather(1, order)
        n_tokens = self.config.action_horizon * self.config.action_dim
        self._check_positions(embeds.shape[1] + n_tokens)
        kwargs = {
            "max_new_tokens": n_tokens,
            "min_new_tokens": n_tokens,
            "do_sample": False,
            "pad_token_id": self.config.pad_token_id,
            **generate_kwargs,
        }
        generated = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return generated[:, -n_tokens:]

    def _check_positions(self, length: int) -> None:
        """Refuse a sequence (image patches, prompt, actions) longer than the language model's positions: RoPE
        would run on positions it was never trained on and give actions without a sign of trouble."""
        limit = self.config.text_config.max_position_embeddings
        if length > limit:
            raise ValueError(
                f"the sequence is {length} tokens (image patches, prompt and action tokens), more than the language "
                f"model's max_position_embeddings={limit}; shorten the instruction"
            )

    def predict_action(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        unnorm_key: str | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Actions in the dataset's units, float32 [B, action_horizon, action_dim], from ``config.norm_stats``."""
        self._action_stats(unnorm_key)  # a bad config fails before generating
        ids = self.generate_action_ids(input_ids, attention_mask, pixel_values, **generate_kwargs)
        return self.actions_from_ids(ids, unnorm_key)

    @property
    def normalizer(self) -> Normalizer:
        """The config's statistics, as the processor reads them: predicted actions go back to dataset units here."""
        return Normalizer.from_config(self.config)

    def _action_stats(self, unnorm_key: str | None) -> dict:
        """The action statistics ``predict_action`` will use, checked (a bad config fails before the forward)."""
        return self.normalizer.stats("action", unnorm_key, self.config.action_dim)

    def actions_from_ids(self, ids: torch.Tensor, unnorm_key: str | None = None) -> torch.Tensor:
        """``generate_action_ids`` output -> ``predict_action`` output (evaluation scores the tokens and the
        actions of one generation)."""
        ids_np = ids.reshape(ids.shape[0], self.config.action_horizon, self.config.action_dim).cpu().numpy()
        normalized = decode_action_ids(ids_np, self.config.tokenizer_vocab_size, self.config.n_action_bins)
        actions = self.normalizer.unnormalize(normalized, "action", unnorm_key)
        return torch.as_tensor(actions, dtype=torch.float32, device=ids.device)
