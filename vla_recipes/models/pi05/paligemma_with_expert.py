"""PaliGemma and a Gemma action expert that attend jointly, layer by layer (openpi's mixture of transformers).

Each stream - the VLM prefix (images + language) and the expert suffix (state/action tokens) - keeps its own norms,
q/k/v/o projections and MLP, but one attention runs over the concatenated sequence, so action tokens read the
prefix keys of the same layer. Module names mirror LeRobot's ``PaliGemmaWithExpertModel``, so both share one
checkpoint layout.

The prefix's own outputs after the last layer are never used (only its keys/values are), so the last VLM layer's
query/output/MLP weights, the VLM final norm and both ``lm_head`` matrices are dead weight: they are kept for the
checkpoint layout, skipped in compute, and frozen so DDP and LoRA never wait for gradients they cannot get.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from .configuration_pi05 import Pi05Config

KeyValue = tuple[Tensor, Tensor]


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply ``layer`` with ``x`` cast to its weight dtype, as LeRobot does between its bf16 and fp32 parts.

    Quantised weights (bitsandbytes) are not floating point and cast their inputs themselves.
    """
    weight = layer.weight
    return layer(x.to(weight.dtype) if weight.is_floating_point() else x)


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    variance = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
    return x * torch.rsqrt(variance + eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm, ``x / rms(x) * (1 + weight)`` in float32; it gates nothing."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, None]:
        return (_rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x), None


class AdaptiveRMSNorm(nn.Module):
    """pi0.5's adaRMS: the time embedding sets a per-channel scale and shift, and the gate of the residual after it."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        modulation = linear(self.dense, cond)
        if x.ndim == 3:
            modulation = modulation.unsqueeze(1)
        scale, shift, gate = modulation.chunk(3, dim=-1)
        normed = _rms_normalize(x, self.eps) * (1 + scale.float()) + shift.float()
        return normed.to(x.dtype), gate.to(x.dtype)


class GemmaAttention(nn.Module):
    """The projections of one layer's attention; the attention itself runs jointly over both streams."""

    def __init__(self, width: int, config: Pi05Config) -> None:
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.head_dim = head_dim
        self.q_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, width, bias=False)

    def split_heads(self, projection: nn.Linear, x: Tensor) -> Tensor:
        """[B, L, width] -> [B, heads, L, head_dim]."""
        return linear(projection, x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)


class GemmaMLP(nn.Module):
    """Gated GELU (tanh) feed-forward."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.down_proj, F.gelu(linear(self.gate_proj, x), approximate="tanh") * linear(self.up_proj, x))


class GemmaDecoderLayer(nn.Module):
    """One Gemma layer's weights; ``adaptive`` swaps its norms for adaRMS (the pi0.5 expert)."""

    def __init__(self, width: int, mlp_dim: int, config: Pi05Config, adaptive: bool) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(width, config)
        self.mlp = GemmaMLP(width, mlp_dim)
        self.input_layernorm = _norm(width, config, adaptive)
        self.post_attention_layernorm = _norm(width, config, adaptive)


def _norm(width: int, config: Pi05Config, adaptive: bool) -> nn.Module:
    if adaptive:
        return AdaptiveRMSNorm(width, config.expert_width, config.rms_norm_eps)
    return GemmaRMSNorm(width, config.rms_norm_eps)


class GemmaScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(width), the scale rounded to the weight dtype first (as transformers' Gemma)."""

    def forward(self, input_ids: Tensor) -> Tensor:
        scale = torch.tensor(self.embedding_dim**0.5).to(self.weight.dtype)
        return super().forward(input_ids) * scale


class GemmaStack(nn.Module):
    """A Gemma decoder's layers and final norm (plus token embeddings for the VLM)."""

    def __init__(self, width: int, depth: int, mlp_dim: int, config: Pi05Config, *, embed: bool, adaptive: bool):
        super().__init__()
        if embed:
            self.embed_tokens = GemmaScaledEmbedding(config.vocab_size, width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(width, mlp_dim, config, adaptive) for _ in range(depth))
        self.norm = _norm(width, config, adaptive)


class MultiModalProjector(nn.Module):
    """SigLIP width -> VLM width (PaliGemma's projector, no scaling)."""

    def __init__(self, vision_width: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, width)


class PaliGemmaBackbone(nn.Module):
    """PaliGemma's vision tower, projector and language model (``paligemma.model``)."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        vision = SiglipVisionConfig(
            hidden_size=config.vision_width,
            intermediate_size=config.vision_mlp_dim,
            num_hidden_layers=config.vision_depth,
            num_attention_heads=config.vision_num_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            layer_norm_eps=config.vision_layer_norm_eps,
            vision_use_head=False,
        )
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = MultiModalProjector(config.vision_width, config.vlm_width)
        self.language_model = GemmaStack(
            config.vlm_width, config.vlm_depth, config.vlm_mlp_dim, config, embed=True, adaptive=False
        )


class PaliGemma(nn.Module):
    """``paligemma``: the backbone plus its (unused) LM head."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.model = PaliGemmaBackbone(config)
        self.lm_head = nn.Linear(config.vlm_width, config.vocab_size, bias=False)


class GemmaExpert(nn.Module):
    """``gemma_expert``: the action expert's layers plus its (unused) LM head; it has no token embeddings."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.model = GemmaStack(
            config.expert_width, config.expert_depth, config.expert_mlp_dim, config, embed=False, adaptive=config.pi05
        )
        self.lm_head = nn.Linear(config.expert_width, config.vocab_size, bias=False)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE tables for ``position_ids`` [B, L], in float32 whatever autocast says (as transformers' Gemma)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = (1.0 / theta**exponent).to(position_ids.device)
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def eager_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    """LeRobot's (transformers' Gemma eager) GQA attention, op for op, so its outputs are reproduced bit for bit:
    matmul, additive mask, softmax in float32. [B, H, Lq, d] -> [B, Lq, H * d]."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query, key.transpose(2, 3)) * query.shape[-1] ** -0.5 + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2)
    return out.reshape(*out.shape[:2], -1)


def sdpa_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    """The same attention through PyTorch's fused kernel, which never materialises the [B, H, Lq, Lk] weights (the
    bulk of pi0.5's compute and memory at ~700 prefix tokens). The kernel wants the additive mask in the query dtype,
    kept finite there: padded prefix rows are fully masked, and an all -inf row would turn into NaNs."""
    if mask.dtype != query.dtype:
        mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=query.shape[1] != key.shape[1])
    out = out.transpose(1, 2)
    return out.reshape(*out.shape[:2], -1)


def _gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    return x + y if gate is None else x + y * gate


def _block(layer: GemmaDecoderLayer, x: Tensor, attended: Tensor, gate: Tensor | None, cond: Tensor | None) -> Tensor:
    """The rest of a layer once attention is done: output projection, residual, norm, MLP, residual."""
    x = _gated_residual(x, linear(layer.self_attn.o_proj, attended), gate)
    normed, gate = layer.post_attention_layernorm(x, cond)
    return _gated_residual(x, layer.mlp(normed), gate)


class _Stream(NamedTuple):
    """One stream inside a joint layer: its layer weights, input, adaRMS condition, normed input and gate."""

    layer: GemmaDecoderLayer
    hidden: Tensor
    cond: Tensor | None
    normed: Tensor
    gate: Tensor | None


class PaliGemmaWithExpert(nn.Module):
    """Both transformers and the joint forward over them."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.config = config
        self.paligemma = PaliGemma(config)
        self.gemma_expert = GemmaExpert(config)
        self.gradient_checkpointing = False

    def dead_parameter_names(self) -> list[str]:
        """Parameters that cannot reach the loss (see the module docstring), relative to this module."""
        last = f"paligemma.model.language_model.layers.{self.config.vlm_depth - 1}"
        dead = ("self_attn.q_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp")
        prefixes = [f"{last}.{name}" for name in dead]
        prefixes += ["paligemma.model.language_model.norm", "paligemma.lm_head", "gemma_expert.lm_head"]
        return [name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))]

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, patches, vlm_width], SigLIP in its own (float32) dtype."""
        backbone = self.paligemma.model
        pixels = pixel_values.to(backbone.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype)
        features = backbone.vision_tower(pixel_values=pixels).last_hidden_state
        return linear(backbone.multi_modal_projector.linear, features)

    def embed_language(self, input_ids: Tensor) -> Tensor:
        return self.paligemma.model.language_model.embed_tokens(input_ids)

    def forward(
        self,
        prefix: Tensor | None,
        suffix: Tensor | None,
        attention_mask: Tensor,
        position_ids: Tensor,
        adarms_cond: Tensor | None = None,
        past_key_values: list[KeyValue] | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor | None, list[KeyValue] | None]:
        """Run the layers over the prefix and/or suffix; return the normed suffix output and the key/value cache.

        ``attention_mask`` is additive, [B, 1, queries, keys], with keys = cached prefix + the streams given;
        ``position_ids`` cover the streams given. With ``past_key_values`` (one per layer) the prefix is not re-run.
        """
        dtype = (prefix if prefix is not None else suffix).dtype
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, dtype)
        cache: list[KeyValue] | None = [] if use_cache else None
        for index in range(self.config.vlm_depth):
            past = past_key_values[index] if past_key_values is not None else (None, None)
            args = (index, prefix, suffix, adarms_cond, cos, sin, attention_mask, *past)
            if self.gradient_checkpointing and self.training:
                prefix, suffix, key, value = self._gradient_checkpointing_func(self._layer, *args)
            else:
                prefix, suffix, key, value = self._layer(*args)
            if cache is not None:
                cache.append((key, value))
        if suffix is not None:
            suffix, _ = self.gemma_expert.model.norm(suffix, adarms_cond)
        return suffix, cache

    def _layer(
        self,
        index: int,
        prefix: Tensor | None,
        suffix: Tensor | None,
        cond: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        past_key: Tensor | None,
        past_value: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """One joint layer. Returns (prefix, suffix, keys, values); the prefix is dropped after the last layer."""
        candidates = [
            (self.paligemma.model.language_model.layers[index], prefix, None),
            (self.gemma_expert.model.layers[index], suffix, cond),
        ]
        streams = [_Stream(layer, x, c, *layer.input_layernorm(x, c)) for layer, x, c in candidates if x is not None]
        key = torch.cat([s.layer.self_attn.split_heads(s.layer.self_attn.k_proj, s.normed) for s in streams], dim=2)
        value = torch.cat([s.layer.self_attn.split_heads(s.layer.self_attn.v_proj, s.normed) for s in streams], dim=2)
        key = _apply_rotary(key, cos, sin)
        if past_key is not None:
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        last = index == self.config.vlm_depth - 1
        if last and suffix is None:
            return None, None, key, value
        if last:  # after the last layer only the suffix is read, so only its queries are needed
            streams = streams[-1:]
        query = torch.cat([s.layer.self_attn.split_heads(s.layer.self_attn.q_proj, s.normed) for s in streams], dim=2)
        length = query.shape[2]
        query = _apply_rotary(query, cos[:, -length:], sin[:, -length:])
        attend = eager_attention if self.config._attn_implementation == "eager" else sdpa_attention
        attended = attend(query, key, value, mask[:, :, -length:])
        parts = attended.split([s.hidden.shape[1] for s in streams], dim=1)
        outputs = [_block(s.layer, s.hidden, part, s.gate, s.cond) for s, part in zip(streams, parts, strict=True)]
        new_prefix = outputs[0] if prefix is not None and not last else None
        new_suffix = outputs[-1] if suffix is not None else None
        return new_prefix, new_suffix, key, value
