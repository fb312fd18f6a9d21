"""Flow-matching pieces of pi0 / pi0.5, written to reproduce openpi's (and LeRobot's) numbers exactly.

Conventions: t = 1 is pure noise, t = 0 the data; ``x_t = t * noise + (1 - t) * actions``; the network predicts the
velocity ``noise - actions``; sampling integrates from t = 1 to 0 with forward Euler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .configuration_pi05 import Pi05Config


def sample_noise(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Standard normal float32 noise over all (padded) action dims."""
    return torch.normal(mean=0.0, std=1.0, size=shape, dtype=torch.float32, device=device)


def sample_time(batch_size: int, device: torch.device, config: Pi05Config) -> Tensor:
    """``Beta(alpha, beta) * scale + offset`` per sample, drawn on the CPU (Beta has no MPS kernel) as LeRobot does."""
    alpha = torch.tensor(config.time_beta_alpha, dtype=torch.float32)
    beta = torch.tensor(config.time_beta_beta, dtype=torch.float32)
    time = torch.distributions.Beta(alpha, beta).sample((batch_size,)) * config.time_scale + config.time_offset
    return time.to(dtype=torch.float32, device=device)


def sinusoidal_time_embedding(time: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """[B] -> [B, dim] sine/cosine features over log-spaced periods, computed in float64 where the device has it."""
    dtype = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).to(time.dtype)


def euler_timesteps(num_steps: int) -> list[float]:
    """The times at which the velocity is evaluated: 1, 1 - 1/N, ..., 1/N (step size ``-1/N``)."""
    dt = -1.0 / num_steps
    return [1.0 + step * dt for step in range(num_steps)]


def seeded_noise_and_time(config: Pi05Config, seeds: list[int]) -> dict[str, Tensor]:
    """Per-sample ``noise`` [B, horizon, max_action_dim] and ``time`` [B], each drawn from its sample's seed with the
    sampling above, the global RNG left untouched: the training collator's draws (``VLADataCollator.seeded_draws``)."""
    shape = (1, config.action_horizon, config.max_action_dim)
    noise, time = [], []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(seed)
            noise.append(sample_noise(shape, torch.device("cpu")))
            time.append(sample_time(1, torch.device("cpu"), config))
    return {"noise": torch.cat(noise), "time": torch.cat(time)}
