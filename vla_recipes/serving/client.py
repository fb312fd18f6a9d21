"""The robot side of the protocol, for this package's own tools (``recipes/rollout.py --server``).

It speaks exactly what ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` speaks; that package is not a
dependency because it pins ``numpy<2``. A robot program can use either. ``infer_many`` sends a batch of
observations over as many connections at once, so the server answers them with one batched model call.
"""

from __future__ import annotations

from typing import Any

from websockets.sync.client import ClientConnection, connect

from vla_recipes.serving.codec import packb, unpackb


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
