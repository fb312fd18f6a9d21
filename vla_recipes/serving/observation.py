"""What a robot sends: its observation dict, checked and turned into one model request.

Keys are the model's own (``observation.images.<cam>`` for each of ``config.camera_keys``, ``observation.state``,
``prompt`` or ``task``) or openpi's slash style: nested dicts are flattened with ``/`` (openpi's ALOHA clients send
``{"images": {"cam_high": ...}}``, i.e. ``images/cam_high``), ``observation/<name>`` is the model's camera
``observation.images.<name>`` (or ``observation.<name>``) and ``observation/state`` the state (openpi's LIBERO
client). A key map (``client_key=model_key,...``) names the rest. Keys the model does not read are ignored
(openpi clients send extras), so a misspelt camera shows up as a missing one, with the keys that did arrive.

Images are uint8, HWC or CHW with 3 channels, at any size (the processor resizes). The state is the robot's
(``config.state_dim`` dims, or its full state when the model was trained on ``config.state_indices`` of it) in the
dataset's units: normalisation runs on the server. An optional integer ``seed`` fixes a flow-matching model's noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

STATE_KEY = "observation.state"
PROMPT_KEY = "prompt"
SEED_KEY = "seed"
MAX_PROMPT_CHARS = 2048  # a megabyte "prompt" would tokenise into a megatoken batch


class BadRequest(ValueError):
    """A request the server refuses; the message names the key and what was expected."""


def parse_key_map(text: str | None) -> dict[str, str]:
    """``"client_key=model_key,..."`` -> dict; ``ValueError`` naming the malformed item."""
    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    bad = ["=".join(pair) for pair in pairs if len(pair) != 2 or not pair[0].strip() or not pair[1].strip()]
    if bad:
        raise ValueError(f"--key_map item {bad[0]!r} is not client_key=model_key")
    return {client.strip(): model.strip() for client, model in pairs}


@dataclass
class Request:
    """One observation, checked: what the batched ``predict_action`` needs for one row."""

    images: list[np.ndarray]  # uint8 HWC, in ``config.camera_keys`` order
    state: np.ndarray | None  # float32, the dims the model sees; None for models without a state (OpenVLA)
    task: str
    seed: int | None


class ObservationSpec:
    """The observation a model takes, from its config; ``parse`` checks one request against it."""

    def __init__(self, config: Any, key_map: Mapping[str, str] | None = None, default_prompt: str | None = None):
        self.camera_keys = list(config.camera_keys)
        self.state_dim: int | None = getattr(config, "state_dim", None)
        self.state_indices: list[int] | None = getattr(config, "state_indices", None)
        self.default_prompt = default_prompt
        targets = {*self.camera_keys, STATE_KEY, PROMPT_KEY}
        aliases = {f"observation/{key.rsplit('.', 1)[-1]}": key for key in self.camera_keys}
        self.key_map = {**aliases, "observation/state": STATE_KEY, "task": PROMPT_KEY, **(key_map or {})}
        unknown = sorted({target for target in (key_map or {}).values() if target not in targets})
        if unknown:
            raise ValueError(f"--key_map maps to {unknown}, which the model does not take; it takes {sorted(targets)}")

    def parse(self, observation: Any) -> Request:
        if not isinstance(observation, Mapping):
            raise BadRequest(f"a request is a dict of observations, not {type(observation).__name__}")
        values: dict[str, Any] = {}
        for key, value in _flatten(observation).items():
            target = self.key_map.get(key, key)
            if target in values:
                raise BadRequest(f"two keys of the request give {target!r} (one is {key!r}); send one")
            values[target] = value
        images = [self._image(key, values) for key in self.camera_keys]
        return Request(images, self._state(values), self._prompt(values), _seed(values.get(SEED_KEY)))

    def _image(self, key: str, values: dict) -> np.ndarray:
        if key not in values:
            sent = sorted(values)
            raise BadRequest(f"missing camera {key!r} (the request has {sent}); send it or map a key with --key_map")
        image = values[key]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
            raise BadRequest(f"camera {key!r}: images are uint8 arrays (HWC or CHW, 0..255), got {kind}")
        if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]) or min(image.shape) == 0:
            raise BadRequest(
                f"camera {key!r}: expected an RGB image of shape (H, W, 3) or (3, H, W), got {image.shape}"
            )
        return np.array(image if image.shape[-1] == 3 else image.transpose(1, 2, 0))  # a writable HWC copy

    def _state(self, values: dict) -> np.ndarray | None:
        if self.state_dim is None:
            return None  # the model has no state input (OpenVLA): a state the robot sends is ignored
        if STATE_KEY not in values:
            raise BadRequest(f"missing {STATE_KEY!r} ({self.state_dim} dims; the request has {sorted(values)})")
        try:
            state = np.asarray(values[STATE_KEY], dtype=np.float32)
        except (TypeError, ValueError):
            raise BadRequest(f"{STATE_KEY!r} must be a 1-D array of numbers") from None
        if state.ndim != 1 or not np.isfinite(state).all():
            raise BadRequest(f"{STATE_KEY!r} must be a 1-D array of finite numbers, got shape {state.shape}")
        if self.state_indices is not None:
            if len(state) <= max(self.state_indices):
                raise BadRequest(
                    f"{STATE_KEY!r} has {len(state)} dims; the model reads dims {self.state_indices} of the robot state"
                )
            return state[self.state_indices]
        if len(state) != self.state_dim:
            raise BadRequest(f"{STATE_KEY!r} has {len(state)} dims; this model takes {self.state_dim}")
        return state

    def _prompt(self, values: dict) -> str:
        prompt = values.get(PROMPT_KEY, self.default_prompt)
        if prompt is None:
            raise BadRequest(
                f"missing {PROMPT_KEY!r} (the task instruction); or start the server with --default_prompt"
            )
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"{PROMPT_KEY!r} must be a string of at most {MAX_PROMPT_CHARS} characters")
        return prompt


def _flatten(observation: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"images": {"cam": x}}`` -> ``{"images/cam": x}`` (openpi's flattening of nested observations)."""
    flat: dict[str, Any] = {}
    for key, value in observation.items():
        if not isinstance(key, str):
            raise BadRequest(f"observation keys are strings, got {key!r}")
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**63:
        raise BadRequest(f"{SEED_KEY!r} must be an integer in [0, 2**63), got {value!r}")
    return int(value)
