"""A loaded model behind the server: checked requests in, one batched ``predict_action`` call, action chunks out.

Noise policy for flow-matching models (those whose ``predict_action`` takes ``noise=``): every request's noise is
its own ``(action_horizon, max_action_dim)`` draw, ``seeded_noise(config, seed)``, so a row's chunk depends only on
its own observation and seed, never on which batch it lands in: the same request with the same ``seed`` gives the
same chunk served alone, batched with others, or in-process via
``model.predict_action(**inputs, noise=seeded_noise(config, seed)[None])``. A request without a seed gets one
drawn from the server's generator (``--seed``), so a server answers a replayed sequence of unseeded requests the
same way. Greedy models (OpenVLA) take no noise.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch

from vla_recipes.data.collators import observations
from vla_recipes.serving.observation import ObservationSpec, Request

logger = logging.getLogger(__name__)


def seeded_noise(config: Any, seed: int) -> torch.Tensor:
    """One request's flow-matching noise: float32 N(0, 1) over ``(action_horizon, max_action_dim)``, on the CPU
    (a CPU generator gives the same numbers whatever device the model runs on)."""
    shape = (config.action_horizon, getattr(config, "max_action_dim", config.action_dim))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


class ServedPolicy:
    """``model`` + ``processor`` (as AutoModel / AutoProcessor load them) serving requests of ``spec``."""

    def __init__(self, model: Any, processor: Any, spec: ObservationSpec, seed: int | None = None) -> None:
        self.model, self.processor, self.spec = model, processor, spec
        self.takes_noise = "noise" in inspect.signature(model.predict_action).parameters
        self._seeds = np.random.default_rng(seed)

    @property
    def metadata(self) -> dict:
        """Sent to every client on connect (openpi's metadata frame): what to send and what comes back."""
        config = self.model.config
        return {
            "model_type": config.model_type,
            "camera_keys": self.spec.camera_keys,
            "action_horizon": config.action_horizon,
            "action_dim": config.action_dim,
            "state_dim": self.spec.state_dim,
            "state_indices": self.spec.state_indices,
            "norm_mode": config.norm_mode,
            "key_map": self.spec.key_map,
            "takes_seed": self.takes_noise,
        }

    @torch.no_grad()
    def predict(self, requests: list[Request]) -> np.ndarray:
        """Action chunks ``(len(requests), action_horizon, action_dim)`` float32 in the dataset's units."""
        samples = [
            {"images": r.images, "task": r.task, "state": None if r.state is None else torch.tensor(r.state)}
            for r in requests
        ]
        inputs = self.processor(**observations(samples)).to(self.model.device)
        if self.takes_noise:
            seeds = [r.seed if r.seed is not None else int(self._seeds.integers(2**63)) for r in requests]
            inputs["noise"] = torch.stack([seeded_noise(self.model.config, s) for s in seeds]).to(self.model.device)
        return self.model.predict_action(**inputs).float().cpu().numpy()

    def predict_each(self, requests: list[Request]) -> list[np.ndarray | Exception]:
        """One chunk (or the exception) per request: the batch in one call; if that fails, each request alone, so
        one bad row fails only its own request."""
        try:
            return list(self.predict(requests))
        except Exception:
            if len(requests) == 1:
                raise
            logger.warning("a batch of %d failed; running its requests one by one", len(requests), exc_info=True)
        results: list[np.ndarray | Exception] = []
        for request in requests:
            try:
                results.append(self.predict([request])[0])
            except Exception as e:
                results.append(e)
        return results
