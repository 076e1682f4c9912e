"""Length-bucketed batching for the inference pipelines.

Encodings are sorted by length and cut into batches; each batch is padded to a bucket shape
(rows and tokens rounded up to powers of two by the fine-tuning batches' `bucket_lengths`, up
to the batch size and the model's limit), so the jit-compiled model forward and a pipeline's
jit-compiled post-processing compile once per bucket instead of once per input length.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tokenizers

from bert_jax.data.batching import bucket_lengths
from bert_jax.pretrained import PretrainedModel


def _bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size`, else `size` itself (an over-long input then
    reaches the model, which names its limit in the error)."""
    return next((b for b in buckets if b >= size), size)


def run_in_buckets(model: PretrainedModel, encodings: Sequence[tokenizers.Encoding],
                   post: Callable[[Any, dict[str, jax.Array]], Any], *, batch_size: int = 32,
                   **forward_kwargs) -> list[Any]:
    """`post(model_output, inputs)` for every encoding, in input order, as NumPy row slices.

    post: a jitted function of the model's output and the padded inputs that reduces what
        leaves the device (probabilities, top-k, pooled vectors); its leaves keep the batch
        axis first, and each result is one row of them (token axes still padded).
    forward_kwargs: extra model arguments, e.g. output_hidden_states=True.
    """
    lengths = bucket_lengths(model.config.max_length[1])
    row_counts = bucket_lengths(batch_size, smallest=1)
    with_types = _accepts(type(model.module), "token_type_ids")
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
    results: list[Any] = [None] * len(encodings)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        rows_padded = rows + rows[-1:] * (_bucket(len(rows), row_counts) - len(rows))
        length = _bucket(len(encodings[rows[0]].ids), lengths)
        inputs = pad([encodings[i] for i in rows_padded], length, model.config.pad_token_id)
        if not with_types:
            del inputs["token_type_ids"]
        out = jax.device_get(post(model(**inputs, **forward_kwargs), inputs))
        for slot, i in enumerate(rows):
            results[i] = jax.tree.map(lambda x, slot=slot: x[slot], out)
    return results


def pad(encodings: Sequence[tokenizers.Encoding], length: int,
        pad_id: int) -> dict[str, np.ndarray]:
    """input_ids / token_type_ids / attention_mask [B, length], right-padded."""
    ids = np.full((len(encodings), length), pad_id, np.int32)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n], types[row, :n], mask[row, :n] = e.ids, e.type_ids, 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


@functools.cache
def _accepts(module_cls: type, name: str) -> bool:
    return name in inspect.signature(module_cls.__call__).parameters
