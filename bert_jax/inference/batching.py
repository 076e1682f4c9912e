"""Length-bucketed batching for the inference pipelines.

Encodings are sorted by length and cut into batches; each batch is padded to a bucket shape
(rows rounded up to a power of two, tokens to a power of two or 1.5 times one, by the
fine-tuning batches' `bucket_lengths`, up to the batch size and the model's limit), so the
jit-compiled model forward and a pipeline's jit-compiled post-processing compile once per
bucket instead of once per input length. The midpoints cut the padding of lengths spread
evenly from about a quarter to about a seventh of the tokens computed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tokenizers

from bert_jax.data.batching import Features, bucket, bucket_lengths, pad_rows
from bert_jax.pretrained import PretrainedModel


def run_in_buckets(model: PretrainedModel, encodings: Sequence[tokenizers.Encoding],
                   post: Callable[[Any, dict[str, jax.Array]], Any], *, batch_size: int = 32,
                   extra_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                   | None = None, **forward_kwargs) -> list[Any]:
    """`post(model_output, inputs)` for every encoding, in input order, as NumPy row slices.

    post: a jitted function of the model's output and the padded inputs that reduces what
        leaves the device (probabilities, top-k, pooled vectors); its leaves keep the batch
        axis first, and each result is one row of them (token axes still padded).
    extra_inputs: more inputs made from each padded batch (e.g. fill-mask's mask positions),
        given to the model where its signature takes them and to `post` where it does not.
    forward_kwargs: extra model arguments, e.g. output_hidden_states=True.
    """
    lengths = bucket_lengths(model.config.max_length[1], midpoints=True)
    row_counts = bucket_lengths(batch_size, smallest=1)
    names = ("input_ids", "attention_mask",
             *(["token_type_ids"] if _accepts(type(model.module), "token_type_ids") else []))
    features = Features.from_encodings(encodings)
    order = sorted(range(len(features)), key=lambda i: -len(features.input_ids[i]))
    results: list[Any] = [None] * len(features)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        rows_padded = rows + rows[-1:] * (bucket(len(rows), row_counts) - len(rows))
        length = bucket(len(features.input_ids[rows[0]]), lengths)
        padded = pad_rows(features, np.array(rows_padded), length, model.config.pad_token_id)
        inputs = {name: padded[name] for name in names}
        extra = extra_inputs(inputs) if extra_inputs else {}
        taken = {k: v for k, v in extra.items() if _accepts(type(model.module), k)}
        out = model(**inputs, **taken, **forward_kwargs)
        out = jax.device_get(post(out, inputs | {k: v for k, v in extra.items() if k not in taken}))
        for slot, i in enumerate(rows):
            results[i] = jax.tree.map(lambda x, slot=slot: x[slot], out)
    return results


@functools.cache
def _accepts(module_cls: type, name: str) -> bool:
    return name in inspect.signature(module_cls.__call__).parameters
