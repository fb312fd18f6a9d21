"""ActionTokenizer reproduces OpenVLA's reference numbers (openvla.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest

from vla_recipes.models.char_tokenizer import build_llama_like_tokenizer
from vla_recipes.models.openvla import ActionTokenizer


class LlamaVocabStandIn:
    """The two things ActionTokenizer reads from Llama's tokenizer, with its vocab_size of 32000."""

    vocab_size = 32000

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows: list[list[int]]) -> list[str]:
        return [self.decode(row) for row in rows]


@pytest.fixture
def llama() -> ActionTokenizer:
    return ActionTokenizer(LlamaVocabStandIn())


def test_reference_ids(llama: ActionTokenizer) -> None:
    actions = np.array([-1.0, 1.0, 0.0, -5.0, 5.0, 0.999, -0.999])
    assert llama.encode(actions).tolist() == [31999, 31744, 31872, 31999, 31744, 31745, 31999]
    assert llama.action_token_begin_idx == 31743
    assert llama.bins.shape == (256,) and llama.bin_centers.shape == (255,)
    assert llama.bins.dtype == np.float64


def test_reference_decode(llama: ActionTokenizer) -> None:
    centers = llama.bin_centers
    assert centers[0] == pytest.approx(-1 + 1 / 255) and centers[254] == pytest.approx(1 - 1 / 255)
    ids = np.array([31744, 31745, 2, 31743, 32000, 31999, 31872])
    expected = centers[[254, 254, 254, 254, 0, 0, 127]]
    np.testing.assert_array_equal(llama.decode_token_ids_to_actions(ids), expected)


def test_round_trip_within_half_a_bin(llama: ActionTokenizer) -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, size=(4, 5, 7))
    ids = llama.encode(actions)
    assert ids.shape == actions.shape and ids.dtype == np.int64
    assert ids.min() >= 32000 - 256 and ids.max() <= 31999
    np.testing.assert_array_less(np.abs(llama.decode_token_ids_to_actions(ids) - actions), 1 / 255 + 1e-12)


def test_call_decodes_strings(llama: ActionTokenizer) -> None:
    assert llama(np.array([-1.0, 0.0, 1.0])) == "31999 31872 31744"
    assert llama(np.array([[-1.0, 0.0], [1.0, 1.0]])) == ["31999 31872", "31744 31744"]
    with pytest.raises(ValueError, match="encode"):
        llama(np.zeros((2, 2, 2)))


def test_char_tokenizer_action_strings_retokenize_to_the_same_ids() -> None:
    tokenizer = build_llama_like_tokenizer()
    action_tokenizer = ActionTokenizer(tokenizer)
    assert action_tokenizer.vocab_size == 355 and action_tokenizer.action_token_begin_idx == 355 - 257
    actions = np.random.default_rng(1).uniform(-1.2, 1.2, size=7)
    ids = action_tokenizer.encode(actions)
    assert ids.min() >= 355 - 256 and ids.max() <= 354
    assert tokenizer(action_tokenizer(actions), add_special_tokens=False)["input_ids"] == ids.tolist()


def test_char_tokenizer_spans_a_real_size_vocabulary() -> None:
    """A random openvla-7b (benchmarks/gpu.py, a real-size ``model_config``) gets a tokenizer of its 32000 ids: the
    action bins are its last 256 ids and the pad comes after them, as with Llama's."""
    tokenizer = build_llama_like_tokenizer(vocab_size=32000)
    action_tokenizer = ActionTokenizer(tokenizer)
    assert action_tokenizer.vocab_size == 32000 and tokenizer.pad_token_id == 32000
    ids = action_tokenizer.encode(np.array([-1.0, 0.0, 1.0]))
    assert ids.min() >= 32000 - 256 and ids.max() <= 31999
    assert (
        tokenizer(action_tokenizer(np.array([-1.0, 0.0, 1.0])), add_special_tokens=False)["input_ids"] == ids.tolist()
    )
