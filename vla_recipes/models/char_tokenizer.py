"""A character-level tokenizer built locally, for tiny random models (tests, the demo, no network).

It mimics the layout of the real tokenizers where it matters to the models: sentencepiece-style ``▁``
for spaces (so ``"Out: "`` ends in a lone ``▁`` token, as with Llama's 29871), a BOS prepended by the
post-processor, the special ids of the real vocabulary, and for OpenVLA ``num_reserved`` never-typed
tokens at the very end of the base vocabulary (the ids OpenVLA's 256 action bins take over) plus a
``<PAD>`` added *after* it, so ``vocab_size`` excludes the pad as in openvla-7b (32000 vs 32001).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Characters a prompt may contain; anything else maps to the unknown token.
_CHARS = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + ["▁"]
# Never-typed characters for the reserved tail (CJK block: not in any prompt).
_RESERVED_BASE = 0x4E00


def build_char_tokenizer(
    special_tokens: list[str],
    *,
    bos_token: str,
    eos_token: str,
    unk_token: str,
    pad_token: str,
    num_reserved: int = 0,
) -> PreTrainedTokenizerFast:
    """Build the tokenizer.

    ``special_tokens`` take ids 0.. in order (the pad is appended as an added token after the base
    vocabulary when it is not among them); then the printable characters; then ``num_reserved``
    placeholder characters.
    """
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *_CHARS, *(chr(_RESERVED_BASE + i) for i in range(num_reserved))]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, vocab[bos_token])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token
    )
    return tokenizer


def build_llama_like_tokenizer(num_action_bins: int = 256, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """OpenVLA's layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ..., action-bin tail, then ``<PAD>``.

    ``vocab_size``: the base vocabulary to span (without the pad), for a random model of a real size (openvla-7b:
    32000): the reserved tail grows to fill it, so the action bins stay its last ``num_action_bins`` ids.
    """
    specials = ["<unk>", "<s>", "</s>"]
    num_reserved = max(num_action_bins, (vocab_size or 0) - len(specials) - len(_CHARS))
    return build_char_tokenizer(
        specials, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>", num_reserved=num_reserved
    )


def build_gemma_like_tokenizer() -> PreTrainedTokenizerFast:
    """PaliGemma's special ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3."""
    return build_char_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
