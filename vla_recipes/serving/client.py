"""The robot side of the protocol, for this package's own tools (``recipes/rollout.py --server``).

It speaks exactly what ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` speaks; that package is not a
dependency because it pins ``numpy<2``. A robot program can use either. ``infer_many`` sends a batch of
observations over as many connections at once, so the server answers them with one batched model call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from websockets.sync.client import ClientConnection, connect

from vla_recipes.evaluation import ChunkedPolicy
from vla_recipes.serving.codec import packb, unpackb
from vla_recipes.serving.observation import STATE_KEY


class PolicyClient:
    """``PolicyClient("ws://host:8000").infer(observation)`` -> ``{"actions": ..., "server_timing": ...}``."""

    def __init__(self, uri: str, *, api_key: str | None = None, connections: int = 1) -> None:
        uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._sockets: list[ClientConnection] = []
        try:
            for _ in range(connections):
                self._sockets.append(connect(uri, compression=None, max_size=None, additional_headers=headers))
            self.metadata: dict = unpackb(self._sockets[0].recv())
            for socket in self._sockets[1:]:
                socket.recv()
        except BaseException:
            self.close()
            raise

    @property
    def config(self) -> SimpleNamespace:
        """The served model's metadata as attributes (``action_horizon``, ``camera_keys``, ...), like a config."""
        return SimpleNamespace(**self.metadata)

    def infer(self, observation: dict) -> dict:
        return self.infer_many([observation])[0]

    def infer_many(self, observations: list[dict]) -> list[dict]:
        """One answer per observation, sent together (one connection each; at most ``connections``)."""
        if len(observations) > len(self._sockets):
            raise ValueError(f"{len(observations)} observations but only {len(self._sockets)} connections")
        for socket, observation in zip(self._sockets, observations, strict=False):
            socket.send(packb(observation))
        frames = [socket.recv() for socket in self._sockets[: len(observations)]]  # all read: the sockets stay in step
        return [_response(frame) for frame in frames]

    def close(self) -> None:
        for socket in self._sockets:
            socket.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _response(frame: bytes | str) -> dict:
    if isinstance(frame, str):  # the server's error frames are text
        raise RuntimeError(f"policy server: {frame}")
    return unpackb(frame)


class RemoteChunkedPolicy(ChunkedPolicy):
    """:class:`~vla_recipes.evaluation.ChunkedPolicy` whose chunks come from a policy server, for closed-loop
    evaluation of a served model (``recipes/rollout.py --server``). The vector env's observations go out over one
    connection each, so the server answers them with one batched call, as the in-process policy does.

    Images go out as uint8 HWC (LeRobot's float frames are uint8 / 255, so nothing is lost) and the robot's full
    state (the server selects ``state_indices``): the served model sees what the in-process one sees.
    """

    def __init__(self, client: PolicyClient, camera_map: dict[str, str], **kwargs: Any) -> None:
        super().__init__(client, None, camera_map, **kwargs)
        self.state_indices = None

    def predict_samples(self, samples: list[dict]) -> torch.Tensor:
        observations = []
        for sample in samples:
            observation = {key: uint8_hwc(image) for key, image in zip(self.camera_map, sample["images"], strict=True)}
            observation["prompt"] = sample["task"]
            if sample["state"] is not None:
                observation[STATE_KEY] = sample["state"].float().cpu().numpy()
            observations.append(observation)
        answers = self.model.infer_many(observations)
        return torch.from_numpy(np.stack([answer["actions"] for answer in answers]))


def uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """A float CHW frame in [0, 1] as the uint8 HWC array a camera gives."""
    return (image.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
