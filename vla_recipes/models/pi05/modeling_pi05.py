"""pi0.5 / pi0 action prediction: flow matching over PaliGemma + a Gemma action expert.

A transformers ``PreTrainedModel`` (save/load, AutoModel, PEFT, bitsandbytes, gradient checkpointing) that computes
what LeRobot's ``PI05Policy`` / ``PI0Policy`` compute: same state-dict keys (a LeRobot folder loads as is), same
sequence layout, masks, time conditioning and Euler sampler. The one deliberate difference: action steps padded past
an episode's end (``action_is_pad``) carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ...data.normalize import Normalizer
from ..adapters import AdapterFolderMixin
from .configuration_pi05 import FLOAT32_MODULES, Pi05Config
from .flow_matching import euler_timesteps, sample_noise, sample_time, sinusoidal_time_embedding
from .paligemma_with_expert import AdaptiveRMSNorm, GemmaRMSNorm, KeyValue, PaliGemmaWithExpert, linear

# openpi's additive mask value for blocked attention (finite, so fully blocked rows stay NaN-free).
MASK_VALUE = -2.3819763e38
_LORA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def block_attention_mask(prefix_pad: Tensor, suffix_blocks: list[int]) -> tuple[Tensor, Tensor]:
    """Additive mask [B, 1, L, L] and position ids [B, L] for a prefix followed by a suffix.

    Every 1 in ``suffix_blocks`` opens a block that sees all earlier blocks and itself, nothing later; the prefix is
    one bidirectional block. So the prefix never sees the suffix, pi0's state token never sees the actions, and the
    action tokens see everything. Padded prefix tokens are seen by no one and do not advance positions.
    """
    suffix_pad = torch.ones(prefix_pad.shape[0], len(suffix_blocks), dtype=torch.bool, device=prefix_pad.device)
    pad = torch.cat([prefix_pad.bool(), suffix_pad], dim=1)
    blocks = torch.tensor([0] * prefix_pad.shape[1] + suffix_blocks, device=pad.device).cumsum(0)
    allowed = (blocks[None, :] <= blocks[:, None])[None] & pad[:, None, :] & pad[:, :, None]
    return torch.where(allowed[:, None], 0.0, MASK_VALUE), pad.cumsum(dim=1) - 1


@dataclass
class PrefixCache:
    """What the denoising steps reuse: the prefix keys/values per layer and the suffix rows of mask and positions."""

    key_values: list[KeyValue]
    mask: Tensor
    position_ids: Tensor
    dtype: torch.dtype


class Pi05Model(nn.Module):
    """The velocity network (LeRobot's ``PI05Pytorch`` / ``PI0Pytorch``): embeddings, joint transformer, projections."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        width = config.expert_width
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)

    @property
    def suffix_blocks(self) -> list[int]:
        """pi0.5: one block of action tokens. pi0: the state token, then a block of action tokens."""
        openings = [1] if self.config.pi05 else [1, 1]
        return openings + [0] * (self.config.action_horizon - 1)

    def embed_prefix(
        self, pixel_values: Tensor, image_masks: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Camera patches in camera order, then the prompt tokens; returns (embeddings, valid-token mask)."""
        batch, cameras = pixel_values.shape[:2]
        images = self.paligemma_with_expert.embed_images(pixel_values.flatten(0, 1))
        patches = images.shape[1]
        language = self.paligemma_with_expert.embed_language(input_ids)
        embeds = torch.cat([images.reshape(batch, cameras * patches, -1).to(language.dtype), language], dim=1)
        image_pad = image_masks.bool()[:, :, None].expand(batch, cameras, patches).reshape(batch, -1)
        return embeds, torch.cat([image_pad, attention_mask.bool()], dim=1)

    def embed_suffix(self, x_t: Tensor, time: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Noisy-action tokens (and pi0's state token); returns (embeddings, adaRMS condition or None)."""
        config = self.config
        actions = linear(self.action_in_proj, x_t)
        time_emb = sinusoidal_time_embedding(time, config.expert_width, config.min_period, config.max_period)
        if config.pi05:
            cond = F.silu(linear(self.time_mlp_out, F.silu(linear(self.time_mlp_in, time_emb))))
            return actions, cond
        fused = torch.cat([actions, time_emb[:, None, :].expand_as(actions).to(actions.dtype)], dim=2)
        actions = linear(self.action_time_mlp_out, F.silu(linear(self.action_time_mlp_in, fused)))
        return torch.cat([linear(self.state_proj, state)[:, None, :], actions], dim=1), None

    def forward(
        self,
        pixel_values: Tensor,
        image_masks: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        x_t: Tensor,
        time: Tensor,
        state: Tensor | None = None,
    ) -> Tensor:
        """Velocity [B, horizon, max_action_dim] (float32) at ``x_t``, ``time``, prefix and suffix in one pass."""
        prefix, prefix_pad = self.embed_prefix(pixel_values, image_masks, input_ids, attention_mask)
        suffix, cond = self.embed_suffix(x_t, time, state)
        mask, position_ids = block_attention_mask(prefix_pad, self.suffix_blocks)
        out, _ = self.paligemma_with_expert(prefix, suffix.to(prefix.dtype), mask, position_ids, cond)
        return self._velocity(out)

    def cache_prefix(
        self, pixel_values: Tensor, image_masks: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> PrefixCache:
        """Run the prefix once; sampling then only runs the expert over the suffix."""
        prefix, prefix_pad = self.embed_prefix(pixel_values, image_masks, input_ids, attention_mask)
        mask, position_ids = block_attention_mask(prefix_pad, self.suffix_blocks)
        length = prefix.shape[1]
        _, key_values = self.paligemma_with_expert(
            prefix, None, mask[:, :, :length, :length], position_ids[:, :length], use_cache=True
        )
        return PrefixCache(key_values, mask[:, :, length:], position_ids[:, length:], prefix.dtype)

    def denoise(self, cache: PrefixCache, x_t: Tensor, time: Tensor, state: Tensor | None = None) -> Tensor:
        """Velocity at ``x_t``, ``time`` given a cached prefix."""
        suffix, cond = self.embed_suffix(x_t, time, state)
        out, _ = self.paligemma_with_expert(
            None, suffix.to(cache.dtype), cache.mask, cache.position_ids, cond, past_key_values=cache.key_values
        )
        return self._velocity(out)

    def _velocity(self, suffix_out: Tensor) -> Tensor:
        return linear(self.action_out_proj, suffix_out[:, -self.config.action_horizon :]).float()


@dataclass
class Pi05Output(ModelOutput):
    """``loss``: mean squared velocity error over real action dims and unpadded steps.

    ``losses``: the per-element squared errors [B, horizon, action_dim], zero at padded steps.
    """

    loss: torch.FloatTensor | None = None
    losses: torch.FloatTensor | None = None


class Pi05ForActionPrediction(AdapterFolderMixin, PreTrainedModel):
    """pi0.5 (``config.pi05``) or pi0 with the flow-matching loss and a batched sampler returning dataset units.

    Inputs are what :class:`Pi05Processor` returns: ``pixel_values`` [B, cameras, 3, S, S] in [-1, 1],
    ``image_masks`` [B, cameras] (False = camera missing), ``input_ids`` / ``attention_mask`` [B, tokens], and for
    pi0 only ``state`` [B, state_dim] (normalised). Training also takes normalised ``actions``
    [B, horizon, >= action_dim].
    """

    config_class = Pi05Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # The joint attention runs PyTorch's fused SDPA by default; attn_implementation="eager" gives LeRobot's own.
    _supports_sdpa = True
    _no_split_modules = ["GemmaDecoderLayer", "SiglipEncoderLayer"]
    _keep_in_fp32_modules_strict = FLOAT32_MODULES
    # The same for float16 loads, and what bitsandbytes leaves unquantised (its skip list matches from the start).
    _keep_in_fp32_modules = [f".*{name}" for name in FLOAT32_MODULES]

    def __init__(self, config: Pi05Config) -> None:
        super().__init__(config)
        self.model = Pi05Model(config)
        self.post_init()
        self.freeze_dead_parameters()
        self._keep_float32_modules()

    @classmethod
    def from_pretrained(cls, *args: Any, output_loading_info: bool = False, **kwargs: Any) -> Any:
        """transformers' loader, plus two of LeRobot's loading rules.

        A checkpoint holding only PaliGemma's ``lm_head`` (openpi conversions tie it to the token embeddings) gets
        its embeddings from it, and the dead parameters are frozen again (loading re-creates parameters, unfrozen).
        """
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        embeddings = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
        if embeddings in info["missing_keys"]:
            lm_head = model.model.paligemma_with_expert.paligemma.lm_head.weight
            if not lm_head.is_floating_point():
                raise ValueError("token embeddings only in lm_head: load unquantised once and save_pretrained")
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(lm_head)
            info["missing_keys"].remove(embeddings)
        model.freeze_dead_parameters()
        return (model, info) if output_loading_info else model

    def _keep_float32_modules(self) -> None:
        """Built under a bfloat16 default dtype, put back in float32 what LeRobot keeps in float32."""
        for name, param in self.named_parameters():
            if param.is_floating_point() and any(key in name for key in FLOAT32_MODULES):
                param.data = param.data.float()

    def _init_weights(self, module: nn.Module) -> None:
        """openpi's init for our modules (SigLIP initialises itself); adaRMS starts as identity with a closed gate."""
        std = self.config.initializer_range
        if isinstance(module, AdaptiveRMSNorm):
            init.zeros_(module.dense.weight)
            init.zeros_(module.dense.bias)
        elif isinstance(module, GemmaRMSNorm):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.paligemma_with_expert.paligemma.model.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.paligemma_with_expert.paligemma.model.language_model.embed_tokens = value

    def dead_parameter_names(self) -> list[str]:
        """Parameters kept only for LeRobot's checkpoint layout; they never reach the loss and stay frozen."""
        return [
            f"model.paligemma_with_expert.{name}" for name in self.model.paligemma_with_expert.dead_parameter_names()
        ]

    def freeze_dead_parameters(self) -> None:
        """Freeze what cannot get a gradient, so DDP needs no ``find_unused_parameters`` and no optimizer tracks it."""
        for name in self.dead_parameter_names():
            self.get_parameter(name).requires_grad_(False)

    def action_head_modules(self) -> list[str]:
        """The flow-matching projections (LeRobot names): trained in every mode, PEFT ``modules_to_save`` under LoRA."""
        if self.config.pi05:
            return ["action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"]
        return ["state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"]

    def freeze_vlm(self) -> None:
        """``expert_only`` fine-tuning: freeze PaliGemma (vision tower, projector, language model).

        The action expert and the action/time/state projections keep training.
        """
        self.model.paligemma_with_expert.paligemma.requires_grad_(False)

    def lora_target_modules(self, include_expert: bool = False) -> list[str]:
        """Full names of the Linear layers LoRA should adapt: the VLM language model's attention and MLP
        projections (those that reach the loss), and with ``include_expert`` the action expert's too."""
        stacks = ["model.paligemma_with_expert.paligemma.model.language_model.layers."]
        if include_expert:
            stacks.append("model.paligemma_with_expert.gemma_expert.model.layers.")
        dead = {name.rsplit(".", 1)[0] for name in self.dead_parameter_names()}
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear)
            and name.startswith(tuple(stacks))
            and name.endswith(_LORA_LINEARS)
            and name not in dead
        ]

    def forward(
        self,
        pixel_values: Tensor,
        image_masks: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        actions: Tensor,
        action_is_pad: Tensor | None = None,
        state: Tensor | None = None,
        noise: Tensor | None = None,
        time: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Pi05Output:
        """Flow-matching loss on normalised ``actions`` [B, horizon, D >= action_dim] (dims past action_dim ignored).

        ``noise`` [B, horizon, max_action_dim] and ``time`` [B] default to LeRobot's draws (N(0, 1); Beta(1.5, 1)
        scaled to [0.001, 1]); pass them to reproduce a loss. Steps flagged in ``action_is_pad`` [B, horizon] are
        excluded from the loss and, as LeRobot's dataset pads an episode's end, hold the last real action.
        ``num_items_in_batch`` (unpadded steps x action_dim over an accumulation window) replaces the batch's own
        count as the divisor, so accumulated micro-batches sum to the loss of one big batch.
        """
        config = self.config
        self._check_inputs(pixel_values, state)
        if actions.ndim != 3 or actions.shape[1] != config.action_horizon or actions.shape[2] < config.action_dim:
            raise ValueError(
                f"actions have shape {tuple(actions.shape)}; expected [batch, {config.action_horizon}, "
                f">= {config.action_dim}] (config.action_horizon, config.action_dim)"
            )
        real = actions[..., : config.action_dim].float()
        if action_is_pad is not None:
            real = _hold_last_real_step(real, action_is_pad.bool())
        target = F.pad(real, (0, config.max_action_dim - config.action_dim))
        batch = target.shape[0]
        noise = sample_noise(target.shape, target.device) if noise is None else noise.to(target.device, torch.float32)
        time = sample_time(batch, target.device, config) if time is None else time.to(target.device, torch.float32)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * target
        u_t = noise - target
        v_t = self.model(pixel_values, image_masks, input_ids, attention_mask, x_t, time, self._pad_state(state))
        losses = F.mse_loss(u_t, v_t, reduction="none")[..., : config.action_dim]
        if action_is_pad is not None:
            losses = losses * (~action_is_pad.bool())[..., None]
        if num_items_in_batch is not None:
            loss = losses.sum() / num_items_in_batch
        elif action_is_pad is None:
            loss = losses.mean()  # LeRobot's reduction
        else:
            loss = losses.sum() / ((~action_is_pad.bool()).sum() * config.action_dim).clamp(min=1)
        return Pi05Output(loss=loss, losses=losses)

    @torch.no_grad()
    def sample_actions(
        self,
        pixel_values: Tensor,
        image_masks: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        state: Tensor | None = None,
        noise: Tensor | None = None,
        num_inference_steps: int | None = None,
    ) -> Tensor:
        """Normalised actions [B, horizon, action_dim] (float32): Euler from t=1 (``noise``) to t=0, prefix cached."""
        self._check_inputs(pixel_values, state)
        config = self.config
        batch, device = input_ids.shape[0], input_ids.device
        shape = (batch, config.action_horizon, config.max_action_dim)
        x_t = sample_noise(shape, device) if noise is None else noise.to(device, torch.float32)
        state = self._pad_state(state)
        cache = self.model.cache_prefix(pixel_values, image_masks, input_ids, attention_mask)
        steps = num_inference_steps or config.num_inference_steps
        for t in euler_timesteps(steps):
            time = torch.tensor(t, dtype=torch.float32, device=device).expand(batch)
            x_t = x_t + (-1.0 / steps) * self.model.denoise(cache, x_t, time, state)
        return x_t[..., : config.action_dim]

    @torch.no_grad()
    def predict_action(
        self,
        pixel_values: Tensor,
        image_masks: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        state: Tensor | None = None,
        noise: Tensor | None = None,
        num_inference_steps: int | None = None,
        unnorm_key: str | None = None,
        reference_state: Tensor | None = None,
    ) -> Tensor:
        """Actions [B, horizon, action_dim] (float32) in the dataset's units, un-normalised with ``config.norm_stats``.

        ``unnorm_key`` picks the dataset when the model holds several datasets' statistics. A model trained on
        relative actions (``config.relative_action_mask``) needs ``reference_state`` [B, state_dim], the raw state
        (``Pi05Processor`` returns it): it is added back, so the actions are absolute either way.
        """
        self._action_stats(unnorm_key)  # a bad config or a missing reference state fails before sampling
        self.normalizer.check_reference_state(reference_state)
        actions = self.sample_actions(
            pixel_values, image_masks, input_ids, attention_mask, state, noise, num_inference_steps
        )
        return self.normalizer.actions_from_model(actions, reference_state, unnorm_key)

    @property
    def normalizer(self) -> Normalizer:
        """The config's statistics, as the processor reads them: predicted actions go back to dataset units here."""
        return Normalizer.from_config(self.config)

    def _action_stats(self, unnorm_key: str | None) -> dict[str, Any]:
        """The action statistics ``predict_action`` will use, checked against ``config.action_dim``."""
        return self.normalizer.stats("action", unnorm_key, self.config.action_dim)

    def _check_inputs(self, pixel_values: Tensor, state: Tensor | None) -> None:
        config = self.config
        expected = (len(config.camera_keys), 3, config.image_size, config.image_size)
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values have shape {tuple(pixel_values.shape)}; expected [batch, "
                f"{', '.join(map(str, expected))}] (config.camera_keys, image_size): build them with Pi05Processor"
            )
        if config.pi05 and state is not None:
            raise ValueError("pi0.5 reads the state from the prompt (Pi05Processor puts it there); do not pass state=")
        if not config.pi05 and (state is None or state.shape[-1] > config.max_state_dim):
            raise ValueError(f"pi0 needs state= [batch, <= {config.max_state_dim}] (normalised, from Pi05Processor)")

    def _pad_state(self, state: Tensor | None) -> Tensor | None:
        if state is None:
            return None
        return F.pad(state.float(), (0, self.config.max_state_dim - state.shape[-1]))


def _hold_last_real_step(actions: Tensor, is_pad: Tensor) -> Tensor:
    """Replace padded steps by the last real step before them (what LeRobot's dataset stores there)."""
    steps = torch.arange(actions.shape[1], device=actions.device).expand(is_pad.shape)
    source = torch.where(is_pad, 0, steps).cummax(dim=1).values
    return actions.gather(1, source[..., None].expand_as(actions))
