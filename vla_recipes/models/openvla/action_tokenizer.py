"""OpenVLA's action tokenizer: continuous actions <-> the last ``bins`` ids of the LM vocabulary.

The math is OpenVLA's (``prismatic/vla/action_tokenizer.py``) to the bit, so a model fine-tuned here and
openvla/openvla-7b agree on what every action token means: ``bins`` are ``linspace`` *edges*, an action
``a`` becomes ``vocab_size - digitize(clip(a))`` (reversed: -1 -> V-1, +1 -> V-256) and a token id decodes to
the centre of its bin. ``vocab_size`` is the base vocabulary (``tokenizer.vocab_size``, without the added
``<PAD>``), i.e. ``text_config.vocab_size - pad_to_multiple_of`` on the model side.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def bin_centers(n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0) -> np.ndarray:
    """The ``n_bins - 1`` centres between the ``n_bins`` edges (float64, as the reference)."""
    edges = np.linspace(min_action, max_action, n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def decode_action_ids(
    ids: Any, vocab_size: int, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0
) -> np.ndarray:
    """Token ids -> normalised actions (float64); non-action ids are clipped into the range like the reference."""
    centers = bin_centers(n_bins, min_action, max_action)
    return centers[np.clip(vocab_size - np.asarray(ids) - 1, 0, centers.shape[0] - 1)]


class ActionTokenizer:
    """Discretises actions in ``[min_action, max_action]`` into ``bins`` tokens at the end of the vocabulary.

    ``tokenizer`` needs ``vocab_size`` (and ``decode``/``batch_decode`` for ``__call__``).
    """

    def __init__(self, tokenizer: Any, bins: int = 256, min_action: float = -1, max_action: float = 1) -> None:
        self.tokenizer = tokenizer
        self.n_bins, self.min_action, self.max_action = bins, min_action, max_action
        self.vocab_size: int = tokenizer.vocab_size
        self.bins = np.linspace(min_action, max_action, self.n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def action_token_begin_idx(self) -> int:
        """One below the smallest action id (the reference tests ``id > action_token_begin_idx``)."""
        return int(self.vocab_size - (self.n_bins + 1))

    def encode(self, actions: Any) -> np.ndarray:
        """Actions of any shape -> token ids (int64) of the same shape."""
        clipped = np.clip(np.asarray(actions), float(self.min_action), float(self.max_action))
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def __call__(self, action: Any) -> str | list[str]:
        """One action (1-D) -> its decoded token string; a batch (2-D) -> one string per row."""
        ids = self.encode(action)
        if ids.ndim == 1:
            return self.tokenizer.decode(list(ids))
        if ids.ndim == 2:
            return self.tokenizer.batch_decode(ids.tolist())
        raise ValueError(f"ActionTokenizer takes a 1-D action or a 2-D batch; got shape {ids.shape} (use encode())")

    def decode_token_ids_to_actions(self, action_token_ids: Any) -> np.ndarray:
        """Token ids -> normalised actions at the bin centres (float64)."""
        return decode_action_ids(action_token_ids, self.vocab_size, self.n_bins, self.min_action, self.max_action)
