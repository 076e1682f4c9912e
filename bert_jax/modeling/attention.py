"""The one attention function every model family calls.

`attend` takes q, k, v and an `AttentionMask` (which keys each query may see: padding,
segment ids of packed sequences, causal, a sliding window) and dispatches to a backend:

* "reference": plain XLA einsums with an fp32 softmax. The test oracle for the others.
* "jax":       `jax.nn.dot_product_attention`, letting JAX pick the implementation.
* "cudnn":     `jax.nn.dot_product_attention(implementation="cudnn")`, flash attention on GPU
               (bf16/fp16). Padding reaches it as sequence lengths, so it must be on the
               right (the tokenizers' default); causal and windows are native.

Shapes: B batch, T query length, S key length, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AttentionMask:
    """Which keys each query may attend to. Every part is optional.

    key_padding_BS: True for real key tokens (the HF `attention_mask`).
    query_segment_ids_BT / key_segment_ids_BS: packed sequences; a query only sees keys with
        the same segment id.
    causal: a query at position i sees keys j <= i.
    window: (left, right): a query at i sees keys i - left <= j <= i + right.
    """

    key_padding_BS: jax.Array | None = None
    query_segment_ids_BT: jax.Array | None = None
    key_segment_ids_BS: jax.Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)
    window: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

    def to_dense(self, query_length: int, key_length: int) -> jax.Array | None:
        """A boolean mask broadcastable to [B, N, T, S], or None when nothing is masked."""
        mask = None

        def both(a, b):
            return b if a is None else a & b

        if self.key_padding_BS is not None:
            mask = self.key_padding_BS.astype(bool)[:, None, None, :]
        if self.query_segment_ids_BT is not None:
            same = self.query_segment_ids_BT[:, :, None] == self.key_segment_ids_BS[:, None, :]
            mask = both(mask, same[:, None])
        if self.causal or self.window is not None:
            i = jnp.arange(query_length)[:, None]
            j = jnp.arange(key_length)[None, :]
            allowed = jnp.ones((query_length, key_length), bool)
            if self.causal:
                allowed &= j <= i
            if self.window is not None:
                left, right = self.window
                allowed &= (j >= i - left) & (j <= i + right)
            mask = both(mask, allowed[None, None])
        return mask


def attend(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, *, backend: str = "reference",
           scale: float | None = None, dropout_rate: float = 0.0,
           dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention; returns [B, T, N, H] in q's dtype.

    Query rows with no visible key return zeros on the reference backend. Dropout on the
    attention probabilities (given `dropout_rng`) is applied by the reference backend only:
    the fused kernels have none, so the fast backends train without it.
    """
    if scale is None:
        scale = q_BTNH.shape[-1] ** -0.5
    dense_mask = mask.to_dense(q_BTNH.shape[1], k_BSNH.shape[1])
    if backend == "reference":
        return _reference(q_BTNH, k_BSNH, v_BSNH, dense_mask, scale, dropout_rate, dropout_rng)
    if backend == "jax":
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=dense_mask, scale=scale)
    if backend == "cudnn":
        return _cudnn(q_BTNH, k_BSNH, v_BSNH, mask, scale)
    raise ValueError(f"unknown attention backend {backend!r}")


def _cudnn(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, scale):
    batch, query_length, key_length = q_BTNH.shape[0], q_BTNH.shape[1], k_BSNH.shape[1]
    lengths_B = None
    if mask.key_padding_BS is not None:
        lengths_B = jnp.sum(mask.key_padding_BS.astype(jnp.int32), axis=-1)
    segments_mask = None
    if mask.query_segment_ids_BT is not None:
        segments_only = AttentionMask(query_segment_ids_BT=mask.query_segment_ids_BT,
                                      key_segment_ids_BS=mask.key_segment_ids_BS)
        segments_mask = jnp.broadcast_to(segments_only.to_dense(query_length, key_length),
                                         (batch, 1, query_length, key_length))
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, mask=segments_mask, scale=scale, is_causal=mask.causal,
        query_seq_lengths=lengths_B if query_length == key_length else None,
        key_value_seq_lengths=lengths_B, local_window_size=mask.window, implementation="cudnn")


def _reference(q_BTNH, k_BSNH, v_BSNH, mask, scale, dropout_rate, dropout_rng):
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH,
                             preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores_BNTS = jnp.where(mask, scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    if mask is not None:
        probs_BNTS = jnp.where(mask, probs_BNTS, 0.0)
    if dropout_rng is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BNTS.shape)
        probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)

