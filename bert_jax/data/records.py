"""The record format of bert_jax's ArrayRecord shards: one tokenized document per record.

A document is a list of sentences, each a list of token ids (sentences matter for NSP).
Bytes, all little-endian int32: [S, len_1, ..., len_S, tokens of sentence 1, ..., S].
"""

from __future__ import annotations

import numpy as np

_DTYPE = np.dtype("<i4")


def encode_document(sentences: list[list[int]]) -> bytes:
    lengths = [len(s) for s in sentences]
    flat = [token for sentence in sentences for token in sentence]
    return np.asarray([len(sentences), *lengths, *flat], _DTYPE).tobytes()


def decode_document(record: bytes) -> list[np.ndarray]:
    """The sentences of a record, as int32 arrays (views into one buffer)."""
    data = np.frombuffer(record, _DTYPE)
    count = int(data[0])
    ends = np.cumsum(data[1:1 + count])
    return np.split(data[1 + count:], ends[:-1]) if count else []
