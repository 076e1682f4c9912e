"""The "splash" attention backend: JAX's Pallas TPU flash-attention kernel.

`jax.experimental.pallas.ops.tpu.splash_attention` (the kernel MaxText trains with) computes
softmax(q k^T) v block by block without materialising the scores, and skips the blocks its
static mask (causal, sliding window) hides entirely. Off TPU the same kernel runs in Pallas
interpret mode: slow, but exactly the TPU code path, which is how the tests check it on the CPU.

How an `AttentionMask` reaches the kernel:
* causal / window: the static mask (`CausalMask`, `LocalMask`), built once per
  (lengths, heads, kind) and cached: building it walks every block in NumPy.
* key padding and packed segments: the kernel's segment ids. Queries carry their segment id
  (0 without packing), keys theirs where real and `PADDING_SEGMENT` where padding.
* lengths: padded up to whole blocks (multiples of 128); the added keys are padding too.
* a query that sees no key returns 0, like the reference (`EMPTY_ROW_SINK`).

Not expressible (`supports` is False, `attend` falls back to the reference): per-row causal
(`causal_rows_B`, GPT-BERT pretraining) and explicit positions (`query_positions_BT`, decoding
caches), each logged once per process. Like every fused kernel it has no attention dropout,
so `attend` refuses to train with it and attention dropout on.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from bert_jax.sharding import activation_spec

if TYPE_CHECKING:
    from bert_jax.modeling.attention import AttentionMask

# The kernel's lane width: block sizes, hence padded lengths, are multiples of it.
LANES = 128
BLOCK_SIZES = (512, 256, LANES)  # the largest dividing the padded length is used
# The key segment id of padding: no real token has it, so no real query sees a padding key.
PADDING_SEGMENT = jnp.iinfo(jnp.int32).min
# An attention-sink logit far below any real score and far above the kernel's masked score:
# where a query sees a key it takes exactly no weight; where it sees none it takes all of it,
# and since the sink carries no value the row is exactly 0 (the kernel alone would return the
# mean of the masked values there).
EMPTY_ROW_SINK = -1e30


def supports(mask: AttentionMask) -> bool:
    """Whether the kernel expresses `mask` (see the module docstring for what it cannot)."""
    return mask.causal_rows_B is None and mask.query_positions_BT is None


def splash_attend(q_BTNH, k_BSNH, v_BSNH, mask: AttentionMask, scale: float) -> jax.Array:
    """Attention through the splash kernel; returns [B, T, N, H] in q's dtype.

    Under a mesh (`jax.set_mesh`) the kernel runs per shard in a `shard_map`, examples split
    like the residual stream and heads over "tensor": XLA cannot partition a Mosaic kernel.
    """
    batch, query_length = q_BTNH.shape[:2]
    key_length = k_BSNH.shape[1]
    q_segments_BT = jnp.zeros((batch, query_length), jnp.int32)
    if mask.query_segment_ids_BT is not None:
        q_segments_BT = mask.query_segment_ids_BT.astype(jnp.int32)
    k_segments_BS = jnp.zeros((batch, key_length), jnp.int32)
    if mask.key_segment_ids_BS is not None:
        k_segments_BS = mask.key_segment_ids_BS.astype(jnp.int32)
    if mask.key_padding_BS is not None:
        k_segments_BS = jnp.where(mask.key_padding_BS.astype(bool), k_segments_BS,
                                  PADDING_SEGMENT)

    run = functools.partial(_run_kernel, causal=mask.causal, window=mask.window, scale=scale)
    spec = activation_spec(("batch", "length", "heads", "kv"), q_BTNH.shape)
    if spec is not None:
        ids = PartitionSpec(spec[0], None)
        run = jax.shard_map(run, in_specs=(spec, spec, spec, ids, ids), out_specs=spec,
                            check_vma=False)
    return run(q_BTNH, k_BSNH, v_BSNH, q_segments_BT, k_segments_BS)


def _run_kernel(q_BTNH, k_BSNH, v_BSNH, q_segments_BT, k_segments_BS, *, causal, window, scale):
    """The kernel on whole blocks, one example at a time (vmap), heads major."""
    query_length, heads = q_BTNH.shape[1:3]
    padded_t, padded_s = _padded(query_length), _padded(k_BSNH.shape[1])
    kernel = _kernel(padded_t, padded_s, heads, causal, window,
                     interpret=jax.default_backend() != "tpu")
    segments = splash.SegmentIds(q=_pad_to(q_segments_BT, padded_t, PADDING_SEGMENT),
                                 kv=_pad_to(k_segments_BS, padded_s, PADDING_SEGMENT))

    def heads_major(x_BTNH, length):  # [B, T, N, H] -> [B, N, length, H], zeros after T
        return _pad_to(x_BTNH, length, 0).transpose(0, 2, 1, 3)

    sinks_N = jnp.full((heads,), EMPTY_ROW_SINK, jnp.float32)
    o_BNTH = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids, sinks=sinks_N))(
        heads_major(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), padded_t),
        heads_major(k_BSNH, padded_s), heads_major(v_BSNH, padded_s), segments)
    return o_BNTH.transpose(0, 2, 1, 3)[:, :query_length]


def _padded(length: int) -> int:
    return -(-length // LANES) * LANES


def _block(padded_length: int) -> int:
    return next(b for b in BLOCK_SIZES if padded_length % b == 0)


def _pad_to(x_BT, length: int, value):
    """Pads axis 1 of `x_BT` (a [B, T, ...] array) up to `length` with `value`."""
    widths = [(0, 0)] * x_BT.ndim
    widths[1] = (0, length - x_BT.shape[1])
    return jnp.pad(x_BT, widths, constant_values=value)


@functools.lru_cache(maxsize=64)
def _kernel(query_length: int, key_length: int, heads: int, causal: bool,
            window: tuple[int, int] | None, *, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for one static mask; lengths are whole blocks.

    Built on a helper thread, outside every trace (JAX's trace state is per thread), so its
    block tables are concrete arrays, never tracers of the trace that first asked for it, and
    the cached kernel serves every trace. (`ensure_compile_time_eval` is not enough: inside
    Flax's `nn.scan` init, e.g. `eval_shape` of a scanned model, it still yields tracers.)
    """
    shape = (query_length, key_length)
    if window is not None:
        left, right = window
        static = splash.LocalMask(shape, (left, min(right, 0) if causal else right), offset=0)
    elif causal:
        static = splash.CausalMask(shape)
    else:
        static = splash.FullMask(shape)
    bq, bkv = _block(query_length), _block(key_length)
    block_sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                    block_q_dq=bq, block_kv_dq=bkv)
    with ThreadPoolExecutor(1) as outside_traces:
        return outside_traces.submit(
            splash.make_splash_mha, splash.MultiHeadMask([static] * heads),
            block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret).result()
