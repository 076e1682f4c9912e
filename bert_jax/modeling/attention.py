"""The one attention function every model family calls.

`attend` takes q, k, v and an `AttentionMask` (which keys each query may see: padding,
segment ids of packed sequences, causal, a sliding window) and dispatches to a backend:

* "reference": plain XLA einsums with an fp32 softmax. The test oracle for the others. With a
               sliding window on a long sequence it runs blockwise (`_blockwise_reference`),
               never building the T x S scores.
* "jax":       `jax.nn.dot_product_attention`, letting JAX pick the implementation.
* "cudnn":     `jax.nn.dot_product_attention(implementation="cudnn")`, flash attention on GPU
               (bf16/fp16). Padding reaches it as sequence lengths, so it must be on the
               right (the tokenizers' default); causal and windows are native.
* "splash":    JAX's Pallas splash-attention kernel for TPU (`splash_attention.py`; interpret
               mode elsewhere). Per-row causal and decoding caches fall back to the reference.

Only the reference applies dropout to the attention probabilities. The others refuse it: a
training trace with attention dropout on another backend raises, naming the setting to change,
rather than training without it. Where a backend hands a mask it cannot express to another
path (the fallbacks above), that is logged once per process.

Shapes: B batch, T query length, S key length, N heads, H head dim.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import struct

from bert_jax.errors import BertJaxError
from bert_jax.modeling import splash_attention

logger = logging.getLogger("bert_jax")

# Query rows per block of the blockwise sliding-window reference path (`_blockwise_reference`).
BLOCK_SIZE = 128
# Long attention without a useful window (global layers, full attention) is computed a chunk
# of queries at a time above this many score entries per head (`_query_chunked_reference`).
CHUNKED_ABOVE = 4096 * 4096
QUERY_CHUNK = 512


@struct.dataclass
class AttentionMask:
    """Which keys each query may attend to. Every part is optional.

    key_padding_BS: True for real key tokens (the HF `attention_mask`).
    query_segment_ids_BT / key_segment_ids_BS: packed sequences; a query only sees keys with
        the same segment id.
    causal: a query at position i sees keys j <= i.
    causal_rows_B: causal for the rows where True only (GPT-BERT pretraining mixes causal and
        bidirectional rows in one batch).
    window: (left, right): a query at i sees keys i - left <= j <= i + right.
    query_positions_BT / key_positions_BS: the positions i and j that causal and window
        compare, when they are not the indices in the row (a decoding cache, whose keys sit
        in a ring buffer).
    """

    key_padding_BS: jax.Array | None = None
    query_segment_ids_BT: jax.Array | None = None
    key_segment_ids_BS: jax.Array | None = None
    query_positions_BT: jax.Array | None = None
    key_positions_BS: jax.Array | None = None
    causal_rows_B: jax.Array | None = None
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
        if self.causal or self.window is not None or self.causal_rows_B is not None:
            i_BTS = jnp.arange(query_length)[None, :, None]
            j_BTS = jnp.arange(key_length)[None, None, :]
            if self.query_positions_BT is not None:
                i_BTS = self.query_positions_BT[:, :, None]
                j_BTS = self.key_positions_BS[:, None, :]
            allowed = jnp.ones(jnp.broadcast_shapes(i_BTS.shape, j_BTS.shape), bool)
            if self.causal:
                allowed &= j_BTS <= i_BTS
            if self.causal_rows_B is not None:
                allowed &= (j_BTS <= i_BTS) | ~self.causal_rows_B[:, None, None]
            if self.window is not None:
                left, right = self.window
                allowed &= (j_BTS >= i_BTS - left) & (j_BTS <= i_BTS + right)
            mask = both(mask, allowed[:, None])
        return mask


def attend(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, *, backend: str = "reference",
           scale: float | None = None, dropout_rate: float = 0.0,
           dropout_rng: jax.Array | None = None,
           dropout_field: str = "dropout_rate") -> jax.Array:
    """Scaled dot-product attention; returns [B, T, N, H] in q's dtype.

    Query rows with no visible key return zeros on the reference backend. Dropout on the
    attention probabilities (given `dropout_rng` and a positive `dropout_rate`) exists on the
    reference backend only; on any other it is a BertJaxError that names `dropout_field`,
    the config field that sets the rate.
    """
    if scale is None:
        scale = q_BTNH.shape[-1] ** -0.5
    if backend != "reference" and dropout_rng is not None and dropout_rate > 0:
        raise BertJaxError(f"attention_backend {backend!r} has no attention dropout: set "
                           f"{dropout_field}: 0 or attention_backend: reference")
    if backend == "splash" and splash_attention.supports(mask):
        return splash_attention.splash_attend(q_BTNH, k_BSNH, v_BSNH, mask, scale)
    if backend == "splash":  # not expressible in the kernel
        _fallback_once("splash", "the reference backend", mask)
        backend = "reference"
    if backend == "reference" and _use_blockwise(q_BTNH.shape[1], k_BSNH.shape[1], mask):
        return _blockwise_reference(q_BTNH, k_BSNH, v_BSNH, mask, scale, dropout_rate,
                                    dropout_rng)
    if backend == "reference" and q_BTNH.shape[1] * k_BSNH.shape[1] > CHUNKED_ABOVE:
        return _query_chunked_reference(q_BTNH, k_BSNH, v_BSNH, mask, scale, dropout_rate,
                                        dropout_rng)
    dense_mask = mask.to_dense(q_BTNH.shape[1], k_BSNH.shape[1])
    if backend == "reference":
        return _reference(q_BTNH, k_BSNH, v_BSNH, dense_mask, scale, dropout_rate, dropout_rng)
    if backend == "jax":
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=dense_mask, scale=scale)
    if backend == "cudnn" and (mask.query_positions_BT is not None  # decoding: XLA
                               or mask.causal_rows_B is not None):  # no per-row causal in cuDNN
        _fallback_once("cudnn", "XLA's dot_product_attention", mask)
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=dense_mask, scale=scale)
    if backend == "cudnn":
        return _cudnn(q_BTNH, k_BSNH, v_BSNH, mask, scale)
    raise ValueError(f"unknown attention backend {backend!r}")


_FALLBACKS_LOGGED: set[tuple[str, str]] = set()


def _fallback_once(backend: str, instead: str, mask: AttentionMask) -> None:
    """Log (once per process and kind) that `backend` hands `mask` to another path."""
    what = ("a decoding cache's positions" if mask.query_positions_BT is not None
            else "per-row causal masks (causal_rows, GPT-BERT pretraining)")
    if (backend, what) not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add((backend, what))
        logger.warning("attention_backend %r cannot express %s: that attention runs on %s",
                       backend, what, instead)


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
    """Dense attention in the heads-major layout that XLA's batched matmuls want.

    The mask enters the scores as an additive bias of 0 or the fp32 minimum (any real score
    rounds into the minimum, so the result is the same as selecting it): XLA fuses the
    broadcast add into the softmax. On XLA:CPU, bert-base's attention alone at 2 x 512 took
    14-16 ms per layer this way against 17-32 ms with a select on the [B, 1, 1, S] mask and
    the einsums in the [B, T, N, H] layout.
    """
    q_BNTH, k_BNSH, v_BNSH = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSNH, v_BSNH))
    scores_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH,
                             preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores_BNTS = scores_BNTS + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    if mask is not None:  # rows with no visible key: zeros, not a uniform average
        probs_BNTS = jnp.where(mask, probs_BNTS, 0.0)
    probs_BNTS = _dropout(probs_BNTS, dropout_rate, dropout_rng)
    o_BNTH = jnp.einsum("bnts,bnsh->bnth", probs_BNTS.astype(v_BNSH.dtype), v_BNSH)
    return o_BNTH.transpose(0, 2, 1, 3)


def _dropout(probs, rate: float, rng):
    """Inverted dropout on attention probabilities of any layout (none without `rng`): one
    independent keep draw per (query, key) entry, kept ones scaled by 1 / (1 - rate)."""
    if rng is None or rate <= 0:
        return probs
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0.0)


def _query_chunked_reference(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, scale, dropout_rate,
                             dropout_rng, chunk: int = QUERY_CHUNK):
    """The dense reference, `chunk` queries at a time (a sequential `lax.map`).

    Peak score memory is [B, N, chunk, S] instead of [B, N, T, S]: for a 16k-token global
    layer with 10 heads, 0.3 GiB instead of 10 GiB. Each chunk's mask is the full mask's rows,
    rebuilt from positions.
    """
    batch, length = q_BTNH.shape[:2]
    key_length = k_BSNH.shape[1]
    chunks = -(-length // chunk)
    tail = chunks * chunk - length

    def split(x_BT):  # [B, T, ...] -> [K, B, chunk, ...], padded at the end
        widths = [(0, 0)] * x_BT.ndim
        widths[1] = (0, tail)
        x = jnp.pad(x_BT, widths).reshape(batch, chunks, chunk, *x_BT.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    query_positions = mask.query_positions_BT
    if query_positions is None:
        query_positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    key_positions = mask.key_positions_BS
    if key_positions is None:
        key_positions = jnp.broadcast_to(jnp.arange(key_length), (batch, key_length))
    segments = mask.query_segment_ids_BT
    rngs = None if dropout_rng is None else jax.random.split(dropout_rng, chunks)

    def one_chunk(args):
        q_BCNH, positions_BC, segments_BC, rng = args
        rows = mask.replace(query_positions_BT=positions_BC, key_positions_BS=key_positions,
                            query_segment_ids_BT=segments_BC)
        return _reference(q_BCNH, k_BSNH, v_BSNH, rows.to_dense(chunk, key_length), scale,
                          dropout_rate, rng)

    o_KBCNH = jax.lax.map(one_chunk, (split(q_BTNH), split(query_positions),
                                      None if segments is None else split(segments), rngs))
    return jnp.moveaxis(o_KBCNH, 0, 1).reshape(batch, chunks * chunk, *q_BTNH.shape[2:])[:, :length]


def _block_span(mask: AttentionMask) -> tuple[int, int]:
    """(left, right) keys a block of queries needs beyond its own rows; causal drops `right`."""
    left, right = mask.window
    return left, 0 if mask.causal else right


def _use_blockwise(query_length: int, key_length: int, mask: AttentionMask,
                   block: int = BLOCK_SIZE) -> bool:
    """Blockwise pays when each block's key span (block + left + right) is under half of T.

    Self-attention only (T == S) with a non-negative window, by index. Below that length the span
    covers most of the row anyway and the dense path (one big matmul) is as small and faster.
    """
    if (mask.window is None or query_length != key_length or min(mask.window) < 0
            or mask.query_positions_BT is not None):
        return False
    left, right = _block_span(mask)
    return query_length > 2 * (block + left + right)


def _blockwise_reference(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, scale, dropout_rate,
                         dropout_rng, block: int = BLOCK_SIZE):
    """The reference attention for a sliding window, in O(T * (C + left + right)) memory.

    The dense path builds [B, N, T, S] scores: 10 GiB in fp32 for one 16k-token layer with
    10 heads, although a window of 256 lets each query see at most 513 keys. Here queries are
    cut into K = ceil(T / C) blocks of C rows; block k only sees keys
    [k*C - left, k*C + C - 1 + right], so K/V (and the key mask) are padded by `left` in
    front and `right` (+ the query padding) behind, and every block's span of
    W = C + left + right keys is gathered with one `take`. Inside a block the offset
    j - i = s - left - c is the same for every block, so window and causal are one [C, W]
    mask; padding, segment ids and out-of-range keys come from the gathered key mask.
    Numerics as `_reference`: fp32 scores and softmax, masked probabilities exactly 0.
    Dropout draws an independent keep mask per visible (query, key) pair like the dense
    path, but over the [.., C, W] blocks, so the same rng gives different (equally
    distributed) masks than the dense path.
    """
    batch, length, heads, _ = q_BTNH.shape
    left, right = _block_span(mask)
    blocks = -(-length // block)
    span = block + left + right
    tail = blocks * block - length  # query padding to a whole number of blocks

    def pad_seq(x, before, after):  # zeros (False) on the sequence axis
        widths = [(0, 0)] * x.ndim
        widths[1] = (before, after)
        return jnp.pad(x, widths)

    # Block k's keys are padded positions k*C + [0, W): one gather for all blocks.
    index_KW = jnp.arange(blocks)[:, None] * block + jnp.arange(span)[None, :]

    def key_blocks(x_BS):
        return jnp.take(pad_seq(x_BS, left, right + tail), index_KW, axis=1)

    def query_blocks(x_BT):
        return pad_seq(x_BT, 0, tail).reshape(batch, blocks, block, *x_BT.shape[2:])

    q_BKCNH = query_blocks(q_BTNH)
    k_BKWNH, v_BKWNH = key_blocks(k_BSNH), key_blocks(v_BSNH)

    key_ok_BS = jnp.ones((batch, length), bool)
    if mask.key_padding_BS is not None:
        key_ok_BS = mask.key_padding_BS.astype(bool)
    allowed_BKCW = key_blocks(key_ok_BS)[:, :, None, :]  # padded: False
    if mask.query_segment_ids_BT is not None:
        allowed_BKCW = allowed_BKCW & (query_blocks(mask.query_segment_ids_BT)[..., None]
                                       == key_blocks(mask.key_segment_ids_BS)[:, :, None, :])
    offset_CW = jnp.arange(span)[None, :] - left - jnp.arange(block)[:, None]  # j - i
    window_left, window_right = mask.window
    local_CW = (offset_CW >= -window_left) & (offset_CW <= window_right)
    if mask.causal:
        local_CW &= offset_CW <= 0
    local = local_CW
    if mask.causal_rows_B is not None:
        local = local_CW & ((offset_CW <= 0) | ~mask.causal_rows_B[:, None, None, None])
    allowed_BKNCW = (allowed_BKCW & local)[:, :, None]

    scores_BKNCW = jnp.einsum("bkcnh,bkwnh->bkncw", q_BKCNH, k_BKWNH,
                              preferred_element_type=jnp.float32) * scale
    scores_BKNCW = jnp.where(allowed_BKNCW, scores_BKNCW, jnp.finfo(jnp.float32).min)
    probs_BKNCW = jnp.where(allowed_BKNCW, jax.nn.softmax(scores_BKNCW, axis=-1), 0.0)
    probs_BKNCW = _dropout(probs_BKNCW, dropout_rate, dropout_rng)
    o_BKCNH = jnp.einsum("bkncw,bkwnh->bkcnh", probs_BKNCW.astype(v_BSNH.dtype), v_BKWNH)
    return o_BKCNH.reshape(batch, blocks * block, heads, -1)[:, :length]
