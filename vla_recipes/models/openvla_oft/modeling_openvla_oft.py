"""OpenVLA-OFT: parallel decoding of an action chunk, an L1-regression MLP head, proprio and several cameras.

The sequence (openvla-oft's ``modeling_prismatic.py``) is ``<s>``, the patches of every camera (each image through
the fused DINOv2 + SigLIP backbone), the proprio token, the prompt, then ``action_horizon * action_dim`` action
placeholders whose input embeddings are zeros. The placeholders attend to each other bidirectionally (causal
attention elsewhere), so one forward pass yields the final hidden states of the whole chunk; the action head maps
them, ``action_dim`` at a time, to one normalised action per chunk step. Training minimises the L1 distance to the
normalised actions (OFT's default objective); no language-model head is run.

Rows of a batch keep their own positions: each row's placeholders follow its own prompt and the padding goes last,
so a row gives the same chunk alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

# A remote-code folder (vla_recipes.remote_code) is copied by transformers one import level deep from the module its
# auto_map names: the modules that modeling_openvla imports are imported here too, so that they travel.
from ...data.normalize import Normalizer  # noqa: F401
from ..adapters import AdapterFolderMixin  # noqa: F401
from ..openvla.action_tokenizer import decode_action_ids  # noqa: F401
from ..openvla.configuration_openvla import OpenVLAConfig  # noqa: F401
from ..openvla.modeling_openvla import OpenVLAForActionPrediction, insert_after_bos
from .configuration_openvla_oft import OpenVLAOFTConfig


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual block: ``x + ReLU(Linear(LayerNorm(x)))`` (``ffn.0`` / ``ffn.1`` as OFT stores them)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> Linear -> ReLU -> residual blocks -> LayerNorm -> Linear (OFT's ``MLPResNet``)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """The ``action_dim`` hidden states of one chunk step, concatenated, -> that step's normalised action."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, action_hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, horizon * action_dim, llm_dim] -> [B, horizon, action_dim]."""
        batch, tokens, _ = action_hidden_states.shape
        return self.model(action_hidden_states.reshape(batch, tokens // self.action_dim, -1))


class ProprioProjector(nn.Module):
    """The normalised robot state -> one token in the LLM's embedding space (fc1 -> GELU -> fc2, as OFT)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


def parallel_decoding_mask(valid: torch.Tensor, is_action: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [B, 1, S, S]: causal, except that action placeholders see every placeholder
    of their row; padded keys are never seen. Works with the eager and SDPA attentions (not flash-attention)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    among_actions = is_action[:, :, None] & is_action[:, None, :]
    allowed = (causal[None] | among_actions) & valid[:, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class OpenVLAOFTOutput(ModelOutput):
    """``actions``: normalised [B, horizon, action_dim]; ``loss``: the L1 loss; ``losses``: |error| per element."""

    loss: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    losses: torch.Tensor | None = None


class OpenVLAOFTForActionPrediction(OpenVLAForActionPrediction):
    """OpenVLA-OFT. ``forward`` gives normalised action chunks (and, given ``actions``, the L1 loss);
    ``predict_action`` gives them in the dataset's units, [B, action_horizon, action_dim], in one forward pass."""

    config: OpenVLAOFTConfig
    config_class = OpenVLAOFTConfig
    _supports_flash_attn = False  # the placeholders' bidirectional block needs an explicit mask
    # The new heads stay float32 and are never quantised (QLoRA trains them in full; bitsandbytes' 4-bit weights
    # cannot take gradients).
    _keep_in_fp32_modules_strict = ["action_head", "proprio_projector"]
    _keep_in_fp32_modules = [".*action_head", ".*proprio_projector"]

    def __init__(self, config: OpenVLAOFTConfig) -> None:
        super().__init__(config)
        llm_dim = config.text_config.hidden_size
        self.action_head = L1RegressionActionHead(
            llm_dim, config.action_head_hidden_dim or llm_dim, config.action_dim, config.action_head_num_blocks
        )
        self.proprio_projector = ProprioProjector(llm_dim, config.state_dim) if config.state_dim else None
        self.post_init()
        self.freeze_unused()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Our folders; an OpenVLA folder (its backbone, with a new head); or the layout openvla-oft publishes (the
        merged VLA plus ``action_head--*_checkpoint.pt`` / ``proprio_projector--*_checkpoint.pt``, in a local folder:
        ``hf download`` it first), see :mod:`.published_checkpoint`."""
        from .published_checkpoint import load_published_modules, oft_config_for

        if "config" not in kwargs:
            kwargs["config"] = oft_config_for(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if Path(str(pretrained_model_name_or_path)).is_dir():
            load_published_modules(model, Path(str(pretrained_model_name_or_path)))
        model.freeze_unused()
        return loaded

    def freeze_unused(self) -> None:
        """The LM head is never run (actions come from the action head): frozen, like the unused vision modules."""
        self.vision_backbone.freeze_unused()
        self.language_model.get_output_embeddings().requires_grad_(False)

    def lora_target_modules(self) -> list[str]:
        """OpenVLA's all-linear targets of the VLA; the action head and proprio projector are trained in full."""
        heads = ("action_head", "proprio_projector")
        return [name for name in super().lora_target_modules() if not name.startswith(heads)]

    def _image_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 6 * num_images, S, S] -> projected patches of every camera, in camera order: [B, n * P, llm_dim]."""
        per_image = 3 * len(self.vision_backbone.vits())
        expected = per_image * self.config.num_images
        if pixel_values is None or pixel_values.dim() != 4 or pixel_values.shape[1] != expected:
            got = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"OpenVLA-OFT needs pixel_values with {expected} channels ({per_image} per camera, "
                f"num_images={self.config.num_images}), got {got}; make them with OpenVLAOFTProcessor"
            )
        batch, _, height, width = pixel_values.shape
        images = pixel_values.reshape(batch * self.config.num_images, per_image, height, width)
        vision_dtype = self.vision_backbone.featurizer.patch_embed.proj.weight.dtype
        patches = self.projector(self.vision_backbone(images.to(vision_dtype)))
        return patches.reshape(batch, -1, patches.shape[-1])

    def _proprio_token(self, state: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The robot state, normalised by the processor, projected: [B, 1, llm_dim]."""
        if self.proprio_projector is None:
            return None
        if state is None:
            raise ValueError(f"this OpenVLA-OFT model takes the robot state (state_dim={self.config.state_dim}): "
                             "pass state=[B, state_dim]")  # fmt: skip
        state = torch.as_tensor(state).reshape(batch, -1)
        if state.shape[1] != self.config.state_dim:
            raise ValueError(f"state has {state.shape[1]} dims, the model's state_dim is {self.config.state_dim}")
        weight = self.proprio_projector.fc1.weight
        return self.proprio_projector(state.to(weight.device, weight.dtype))[:, None]

    def _parallel_decoding_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor,
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings [B, S, E], valid-token mask [B, S] and action-placeholder mask [B, S] of the sequence
        ``<s> patches [proprio] prompt placeholders <pad>...``: each row's placeholders right after its prompt."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, n_actions = input_ids.shape[0], self.config.num_action_tokens
        text = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([text, text.new_zeros(batch, n_actions, text.shape[-1])], dim=1)
        valid = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, n_actions, dtype=torch.bool)], 1)
        is_action = torch.zeros_like(valid)
        is_action[:, -n_actions:] = True
        order = torch.argsort((~valid).int(), dim=1, stable=True)  # prompt, placeholders, then the padding
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        valid, is_action = valid.gather(1, order), is_action.gather(1, order)
        prefix = self._image_patches(pixel_values)
        proprio = self._proprio_token(state, batch)
        if proprio is not None:
            prefix = torch.cat([prefix, proprio.to(prefix.dtype)], dim=1)
        prefix_flags = valid.new_zeros(batch, prefix.shape[1])
        embeds = insert_after_bos(embeds, prefix.to(embeds.dtype))
        valid = insert_after_bos(valid, ~prefix_flags)
        is_action = insert_after_bos(is_action, prefix_flags)
        self._check_positions(int(valid.sum(1).max()))
        return embeds, valid, is_action

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        action_is_pad: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> OpenVLAOFTOutput:
        """Normalised action chunks [B, horizon, action_dim] in one pass; with ``actions`` (normalised) the L1 loss
        over the chunk steps that are not padding (``action_is_pad``), summed and divided by ``num_items_in_batch``
        when given (gradient accumulation then equals one big batch), else averaged. ``state`` is normalised (the
        processor's)."""
        embeds, valid, is_action = self._parallel_decoding_inputs(input_ids, attention_mask, pixel_values, state)
        mask = parallel_decoding_mask(valid, is_action, embeds.dtype)
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        action_hidden = hidden.last_hidden_state[is_action].reshape(embeds.shape[0], -1, embeds.shape[-1])
        head_dtype = self.action_head.model.fc1.weight.dtype
        predicted = self.action_head(action_hidden.to(head_dtype)).float()
        if actions is None:
            return OpenVLAOFTOutput(actions=predicted)
        real = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)
        if action_is_pad is not None:
            real = ~action_is_pad.bool()
        losses = (predicted - actions.to(predicted)).abs() * real[..., None]
        divisor = num_items_in_batch if num_items_in_batch is not None else real.sum() * actions.shape[-1]
        loss = losses.sum() / torch.as_tensor(divisor, device=losses.device).clamp(min=1)
        return OpenVLAOFTOutput(loss=loss, actions=predicted, losses=losses)

    def generate_action_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("OpenVLA-OFT decodes no action tokens: its actions come from predict_action")

    def actions_from_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("OpenVLA-OFT decodes no action tokens: its actions come from predict_action")

    @torch.no_grad()
    def predict_action(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        unnorm_key: str | None = None,
        reference_state: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Actions in the dataset's units, float32 [B, action_horizon, action_dim], from one forward pass; a model
        trained on relative actions needs ``reference_state``, the raw state the processor returns."""
        self._action_stats(unnorm_key)  # a bad config or a missing reference state fails before the forward pass
        self.normalizer.check_reference_state(reference_state)
        normalized = self(input_ids, attention_mask, pixel_values, state=state).actions
        return self.normalizer.actions_from_model(normalized.double(), reference_state, unnorm_key).float()
