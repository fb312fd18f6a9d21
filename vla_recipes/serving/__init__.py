"""Serving a fine-tuned policy to robots over openpi's WebSocket protocol, batching concurrent clients.

``recipes/serve.py`` is the command; :class:`PolicyServer` and :class:`ServedPolicy` the library form; a robot talks
to it with ``openpi_client`` (or :class:`PolicyClient`, the same protocol without openpi-client's numpy<2 pin).
"""

from vla_recipes.serving.client import PolicyClient, RemoteChunkedPolicy
from vla_recipes.serving.observation import BadRequest, ObservationSpec, Request, parse_key_map
from vla_recipes.serving.policy import ServedPolicy, seeded_noise
from vla_recipes.serving.server import PolicyServer

__all__ = [
    "BadRequest",
    "ObservationSpec",
    "PolicyClient",
    "PolicyServer",
    "RemoteChunkedPolicy",
    "Request",
    "ServedPolicy",
    "parse_key_map",
    "seeded_noise",
]
