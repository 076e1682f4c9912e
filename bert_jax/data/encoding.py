"""Encode texts (or text pairs) with truncation and overflowing windows, as `transformers`
fast tokenizers do with `truncation=..., max_length=..., stride=..., return_overflowing_tokens`.

The `tokenizers` backend keeps truncation as mutable state, so each call works on a copy
configured for it and the shared tokenizer is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError


def encode(tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
           max_length: int | None = None, stride: int = 0) -> list[list[tokenizers.Encoding]]:
    """For each text (and pair): its encodings, unpadded; more than one only when `max_length`
    cuts it and the rest overflows into windows that overlap by `stride` tokens.

    With pairs only the second text (e.g. a QA context) is cut ("only_second").
    """
    backend = truncating(tokenizer, max_length, stride=stride,
                         strategy="only_second" if pairs is not None else "longest_first")
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    try:
        encodings = backend.encode_batch(inputs)
    except Exception as err:  # tokenizers raises a bare Exception, e.g. a question too long
        raise BertJaxError(f"cannot encode the input with max_length={max_length}, "
                           f"stride={stride}: {err}") from None
    return [[e, *e.overflowing] for e in encodings]


def truncating(tokenizer: Tokenizer, max_length: int | None, *, stride: int = 0,
               strategy: str = "longest_first") -> tokenizers.Tokenizer:
    """A copy of the tokenizer's backend that never pads and cuts to `max_length` tokens
    (None: never), keeping what it cuts as windows overlapping by `stride` tokens."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    if max_length is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(max_length, stride=stride, strategy=strategy)
    return backend
