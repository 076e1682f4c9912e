"""The blockwise sliding-window path of the reference backend against the dense reference.

`attend(..., backend="reference")` switches to `_blockwise_reference` for long windowed
self-attention; here it must equal the dense masked reference (`_reference` on
`AttentionMask.to_dense`) under every mask part, and must really avoid T x T buffers.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.modeling import attention
from bert_jax.modeling.attention import BLOCK_SIZE, AttentionMask, attend

W = 16  # window
T_MID = 333  # > 2 * (BLOCK_SIZE + 2 * W), not a multiple of BLOCK_SIZE: `attend` goes blockwise
WINDOWS = {  # name: (causal, window)
    "bidirectional": (False, (W, W)),
    "asymmetric": (False, (W, 3)),
    "causal": (True, (W, 0)),
    "causal_flash": (True, (W - 1, 0)),  # FlashAttention / training convention, i - j < W
    "causal_wide": (True, (W, W)),  # causal cuts the right half
}


def random_qkv(b, t, n, h, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))


def make_mask(b, t, causal, window, padding=False, segments=False) -> AttentionMask:
    """Row 0 is full; later rows are right-padded. Segments: packed documents, 0 on padding."""
    kw = {}
    lengths = np.array([t] + [t - t // (3 + r) for r in range(1, b)])
    real_BT = np.arange(t)[None, :] < lengths[:, None]
    if padding:
        kw["key_padding_BS"] = jnp.asarray(real_BT)
    if segments:
        cuts = np.array([t // 3 + 7 * r for r in range(b)])
        ids = np.where(np.arange(t)[None, :] < cuts[:, None], 1, 2) * real_BT
        kw["query_segment_ids_BT"] = kw["key_segment_ids_BS"] = jnp.asarray(ids, jnp.int32)
    return AttentionMask(**kw, causal=causal, window=window)


def dense_reference(q, k, v, mask, dropout_rate=0.0, dropout_rng=None):
    """The dense path, whatever the length: [B, N, T, S] scores and mask."""
    t, s = q.shape[1], k.shape[1]
    return attention._reference(q, k, v, mask.to_dense(t, s), q.shape[-1] ** -0.5,
                                dropout_rate, dropout_rng)


def blockwise(q, k, v, mask, block=BLOCK_SIZE, dropout_rate=0.0, dropout_rng=None):
    return attention._blockwise_reference(q, k, v, mask, q.shape[-1] ** -0.5, dropout_rate,
                                          dropout_rng, block=block)


@pytest.mark.parametrize("parts", ["plain", "padding", "segments"])
@pytest.mark.parametrize("kind", WINDOWS)
def test_attend_goes_blockwise_and_matches_dense(kind, parts):
    """Through the public `attend`, with T not a multiple of the block."""
    causal, window = WINDOWS[kind]
    b, t, n, h = 2, T_MID, 3, 8
    q, k, v = random_qkv(b, t, n, h)
    mask = make_mask(b, t, causal, window, padding=parts != "plain",
                     segments=parts == "segments")
    assert attention._use_blockwise(t, t, mask)
    out = attend(q, k, v, mask, backend="reference")
    assert out.shape == (b, t, n, h) and out.dtype == jnp.float32
    expected = dense_reference(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=0)

    # Query rows that see no key (padding far past the last real token) are exactly zero.
    hidden_BT = ~np.asarray(jnp.broadcast_to(mask.to_dense(t, t), (b, 1, t, t)))[:, 0].any(-1)
    assert np.all(np.asarray(out)[hidden_BT] == 0.0)
    if parts != "plain":
        assert hidden_BT.any()


@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("kind", WINDOWS)
def test_any_block_size_matches_dense(kind, block):
    """Many blocks, blocks smaller than the window, T = 100 not a multiple of any of them;
    padding and segments together."""
    causal, window = WINDOWS[kind]
    b, t, n, h = 3, 100, 2, 8
    q, k, v = random_qkv(b, t, n, h, seed=1)
    mask = make_mask(b, t, causal, window, padding=True, segments=True)
    np.testing.assert_allclose(np.asarray(blockwise(q, k, v, mask, block)),
                               np.asarray(dense_reference(q, k, v, mask)), atol=1e-5, rtol=0)


def test_window_wider_than_sequence():
    """Spans reaching past both ends are clipped by the padded (masked) keys."""
    q, k, v = random_qkv(2, 40, 2, 8, seed=2)
    mask = make_mask(2, 40, False, (100, 100), padding=True)
    np.testing.assert_allclose(np.asarray(blockwise(q, k, v, mask, block=16)),
                               np.asarray(dense_reference(q, k, v, mask)), atol=1e-5, rtol=0)


def test_rule():
    """Blockwise only for windowed self-attention whose block span is under half of T."""
    assert not attention._use_blockwise(4096, 4096, AttentionMask())
    assert not attention._use_blockwise(4096, 4096, AttentionMask(causal=True))
    assert not attention._use_blockwise(4096, 2048, AttentionMask(window=(64, 64)))
    assert attention._use_blockwise(4096, 4096, AttentionMask(window=(64, 64)))
    span = BLOCK_SIZE + 2 * 256
    assert not attention._use_blockwise(2 * span, 2 * span, AttentionMask(window=(256, 256)))
    assert attention._use_blockwise(2 * span + 1, 2 * span + 1, AttentionMask(window=(256, 256)))
    # NorBERT 4 at 16k: local layers blockwise, global (8192) layers dense.
    assert attention._use_blockwise(16384, 16384, AttentionMask(window=(256, 256)))
    assert attention._use_blockwise(16384, 16384, AttentionMask(causal=True, window=(255, 0)))
    assert not attention._use_blockwise(16384, 16384, AttentionMask(window=(8192, 8192)))


def test_gradients_match_dense():
    b, t, n, h = 2, T_MID, 2, 8
    q, k, v = random_qkv(b, t, n, h, seed=3)
    mask = make_mask(b, t, False, (W, W), padding=True, segments=True)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((b, t, n, h)), jnp.float32)

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weights), argnums=(0, 1, 2))

    got = loss(lambda *a: attend(*a, backend="reference"))(q, k, v)
    expected = loss(dense_reference)(q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=0)


def test_blockwise_dropout():
    """Inverted dropout on the probabilities: rng-determined, unbiased, a no-op at rate 0."""
    b, t, n, h = 2, T_MID, 2, 8
    q, k, v = random_qkv(b, t, n, h, seed=5)
    mask = make_mask(b, t, True, (W - 1, 0), padding=True)

    def run(rate, rng):
        return attend(q, k, v, mask, backend="reference", dropout_rate=rate, dropout_rng=rng)

    plain = np.asarray(run(0.0, None))
    key = jax.random.key(1)
    dropped = np.asarray(run(0.5, key))
    assert np.all(np.isfinite(dropped)) and np.abs(dropped - plain).max() > 1e-2
    np.testing.assert_array_equal(dropped, np.asarray(run(0.5, key)))
    assert not np.array_equal(dropped, np.asarray(run(0.5, jax.random.key(2))))
    np.testing.assert_array_equal(np.asarray(run(0.0, key)), plain)
    mean = jax.jit(jax.vmap(lambda key: run(0.5, key)))(jax.random.split(key, 256)).mean(0)
    assert np.abs(np.asarray(mean) - plain).mean() < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("causal, window", [(False, (64, 64)), (True, (63, 0))],
                         ids=["bidirectional", "causal"])
def test_long_sequence_matches_dense(causal, window):
    q, k, v = random_qkv(1, 4096, 2, 16, seed=6)
    mask = make_mask(1, 4096, causal, window, segments=True)
    out = jax.jit(lambda q, k, v: attend(q, k, v, mask, backend="reference"))(q, k, v)
    expected = jax.jit(lambda q, k, v: dense_reference(q, k, v, mask))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=0)


def _square_intermediates(closed_jaxpr, t) -> list:
    """Every intermediate (in nested jaxprs too) with at least two axes of length t."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                if sum(d == t for d in getattr(var.aval, "shape", ())) >= 2:
                    found.append((eqn.primitive.name, var.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def test_long_sequence_never_builds_t_by_t():
    """At T = 16384 (abstract inputs, compile only) `attend` has no [.., T, T] intermediate
    and compiles to a fraction of one fp32 T x T matrix of temp memory; the dense path (the
    control) has both."""
    t, n, h = 16384, 2, 16
    q = k = v = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
    mask = make_mask(1, t, False, (64, 64), padding=True, segments=True)

    def fn(q, k, v):
        return attend(q, k, v, mask, backend="reference")

    def dense(q, k, v):
        return dense_reference(q, k, v, mask)

    assert _square_intermediates(jax.make_jaxpr(fn)(q, k, v), t) == []
    assert _square_intermediates(jax.make_jaxpr(dense)(q, k, v), t) != []

    square_bytes = t * t * 4
    stats = jax.jit(fn).lower(q, k, v).compile().memory_analysis()
    if stats is None:  # no memory analysis on this backend: the jaxpr check above stands
        return
    dense_stats = jax.jit(dense).lower(q, k, v).compile().memory_analysis()
    assert dense_stats.temp_size_in_bytes >= n * square_bytes
    assert stats.temp_size_in_bytes < square_bytes / 8, stats.temp_size_in_bytes


@pytest.mark.parametrize("parts", ["plain", "padding", "segments"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (W, W)),
                                           (True, (W - 1, 0))])
def test_query_chunked_matches_dense(causal, window, parts):
    """Long attention without a useful window runs a chunk of queries at a time; T is not a
    multiple of the chunk, and padding / segments / causal / window all still apply."""
    q, k, v = random_qkv(3, 77, 2, 8, seed=5)
    mask = make_mask(3, 77, causal, window, padding=parts != "plain",
                     segments=parts == "segments")
    chunked = attention._query_chunked_reference(q, k, v, mask, 8 ** -0.5, 0.0, None, chunk=16)
    np.testing.assert_allclose(chunked, dense_reference(q, k, v, mask), atol=1e-5, rtol=0)


def test_attend_chunks_long_full_attention():
    """Above CHUNKED_ABOVE score entries per head `attend` never builds [T, T] scores."""
    t = 8192
    assert t * t > attention.CHUNKED_ABOVE
    shape = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, AttentionMask(causal=True)))(
        shape, shape, shape)
    assert not _square_intermediates(jaxpr, t)


@pytest.mark.parametrize("window", [None, (W, W)], ids=["full", "window"])
def test_causal_rows_equal_per_row_causal(window):
    """GPT-BERT pretraining's mixed batches: rows flagged causal attend as `causal=True`, the
    others as bidirectional, on every path (dense, blockwise, query-chunked, jax)."""
    q, k, v = random_qkv(3, T_MID, 2, 8, seed=7)
    rows = np.array([True, False, True])
    mixed = make_mask(3, T_MID, False, window, padding=True, segments=True).replace(
        causal_rows_B=jnp.asarray(rows))
    real = mixed.key_padding_BS
    expected = np.where(rows[:, None, None, None],
                        dense_reference(q, k, v, mixed.replace(causal_rows_B=None, causal=True)),
                        dense_reference(q, k, v, mixed.replace(causal_rows_B=None)))
    scale = 8 ** -0.5
    paths = {"dense": dense_reference(q, k, v, mixed),
             "chunked": attention._query_chunked_reference(q, k, v, mixed, scale, 0.0, None,
                                                           chunk=64),
             # jax.nn gives padded queries (no visible key) no zeros: compare real ones
             "jax": attend(q, k, v, mixed, backend="jax") * real[:, :, None, None]}
    if window is not None:
        paths["blockwise"] = blockwise(q, k, v, mixed)
    for name, out in paths.items():
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0, err_msg=name)
