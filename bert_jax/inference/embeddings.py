"""Sentence embeddings: a batch of texts -> an [N, D] matrix of pooled final hidden states.

Pooling is "mean" (over the real tokens, special tokens included, as sentence-transformers)
or "cls" (the first token); rows are L2-normalised unless `normalize=False`, so dot products
are cosine similarities. Texts longer than the model's limit are cut. Any head works; a base
model (`from_pretrained(dir, head="Model")`) skips computing the head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.data.encoding import encode
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import PretrainedModel

POOLINGS = ("mean", "cls")


def embed(model: PretrainedModel, tokenizer: Tokenizer, texts: list[str], pooling: str = "mean",
          normalize: bool = True, *, batch_size: int = 32) -> np.ndarray:
    """[len(texts), hidden_size] float32 embeddings, one row per text."""
    if pooling not in POOLINGS:
        raise BertJaxError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
    if isinstance(texts, str):
        raise BertJaxError("embed takes a list of texts")
    base = model.config.head == "Model"
    encodings = encode(tokenizer, texts, max_length=model.config.max_length[1])
    rows = run_in_buckets(model, encodings,
                          functools.partial(_pool, pooling=pooling, normalize=normalize),
                          batch_size=batch_size, output_hidden_states=not base)
    return np.stack(rows) if rows else np.zeros((0, model.config.hidden_size), np.float32)


@functools.partial(jax.jit, static_argnames=("pooling", "normalize"))
def _pool(out, inputs, pooling, normalize):
    h_BTD = (out.last_hidden_state if out.hidden_states is None else out.hidden_states[-1])
    h_BTD = h_BTD.astype(jnp.float32)
    if pooling == "cls":
        x_BD = h_BTD[:, 0]
    else:
        mask_BT1 = inputs["attention_mask"][..., None].astype(jnp.float32)
        x_BD = (h_BTD * mask_BT1).sum(1) / jnp.maximum(mask_BT1.sum(1), 1e-9)
    if normalize:
        x_BD = x_BD / jnp.maximum(jnp.linalg.norm(x_BD, axis=-1, keepdims=True), 1e-12)
    return x_BD
