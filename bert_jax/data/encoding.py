"""Encode texts, text pairs or pre-split words with truncation, as `transformers` fast
tokenizers do with `truncation=..., max_length=..., stride=..., is_split_into_words=...`.

The `tokenizers` backend keeps truncation and padding as mutable state, so each call works on
a copy configured for it and the shared tokenizer is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError


def encode(tokenizer: Tokenizer, texts: Sequence, pairs: Sequence | None = None, *,
           max_length: int | None = None, truncation: str = "longest_first", stride: int = 0,
           is_split_into_words: bool = False) -> list[tokenizers.Encoding]:
    """One unpadded encoding per text (and pair), cut to `max_length` tokens (None: never).

    pairs: the texts' second sequences (None where a text has none).
    truncation: the `tokenizers` / `transformers` strategy: "longest_first" (`truncation=True`)
        or "only_second" (cut only the pair, e.g. a QA context).
    stride: what is cut stays in each encoding's `overflowing`, as windows of `max_length`
        tokens that overlap by `stride` tokens.
    is_split_into_words: texts (and pairs) are lists of words rather than strings.
    """
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    if max_length is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(max_length, stride=stride, strategy=truncation)
    inputs = list(texts) if pairs is None else [
        text if pair is None else (text, pair) for text, pair in zip(texts, pairs, strict=True)]
    try:
        return backend.encode_batch(inputs, is_pretokenized=is_split_into_words)
    except Exception as err:  # tokenizers raises a bare Exception, e.g. a question too long
        raise BertJaxError(f"cannot encode the input with max_length={max_length}, "
                           f"stride={stride}: {err}") from None
