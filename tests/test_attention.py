"""The attention core: `attend` backends against an independent NumPy oracle, and its masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.modeling.attention import AttentionMask, attend

B, T, N, H = 2, 12, 3, 8
LENGTHS = (T, 8)  # real tokens per row (right padding)
SEGMENTS = ((1,) * 5 + (2,) * 7, (1,) * 4 + (2,) * 4 + (0,) * 4)  # packed rows; 0 = padding
WINDOW = (2, 3)

CASES = {
    "padding": dict(padding=True),
    "segments": dict(padding=True, segments=True),
    "causal": dict(causal=True),
    "window": dict(window=WINDOW),
    "causal_window": dict(causal=True, window=WINDOW),
    "all": dict(padding=True, segments=True, causal=True, window=WINDOW),
}


def make_mask(padding=False, segments=False, causal=False, window=None) -> AttentionMask:
    """An AttentionMask for one of CASES (keys and queries share the same sequence)."""
    kw = {}
    if padding:
        kw["key_padding_BS"] = jnp.asarray(np.arange(T)[None, :] < np.array(LENGTHS)[:, None])
    if segments:
        ids = jnp.asarray(np.array(SEGMENTS, np.int32))
        kw["query_segment_ids_BT"] = kw["key_segment_ids_BS"] = ids
    return AttentionMask(**kw, causal=causal, window=window)


def numpy_mask(padding=False, segments=False, causal=False, window=None) -> np.ndarray:
    """The same mask as `make_mask`, built independently as a dense [B, T, S] array."""
    mask = np.ones((B, T, T), bool)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    if padding:
        mask &= (np.arange(T)[None, :] < np.array(LENGTHS)[:, None])[:, None, :]
    if segments:
        ids = np.array(SEGMENTS)
        mask &= ids[:, :, None] == ids[:, None, :]
    if causal:
        mask &= (j <= i)[None]
    if window is not None:
        left, right = window
        mask &= ((j >= i - left) & (j <= i + right))[None]
    return mask


def numpy_attention(q, k, v, mask_BTS, scale=H ** -0.5) -> np.ndarray:
    """Float64 attention; masked probabilities are 0, so fully masked query rows give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    mask = mask_BTS[:, None]
    scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.where(mask, np.exp(scores - row_max), 0.0)
    denom = exp.sum(-1, keepdims=True)
    probs = exp / np.where(denom > 0, denom, 1.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def random_qkv(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))


def visible_rows(mask_BTS) -> np.ndarray:
    """[B, T] True where a query sees at least one key."""
    return mask_BTS.any(-1)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_numpy(case):
    """The reference backend is plain scaled-dot-product attention under every mask kind."""
    q, k, v = random_qkv()
    out = attend(q, k, v, make_mask(**CASES[case]), backend="reference")
    assert out.dtype == jnp.float32 and out.shape == (B, T, N, H)
    expected = numpy_attention(q, k, v, numpy_mask(**CASES[case]))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_jax_backend_matches_reference(case, dtype, atol):
    """jax.nn.dot_product_attention agrees with the reference on rows with a visible key."""
    q, k, v = random_qkv(dtype)
    mask = make_mask(**CASES[case])
    ref = np.asarray(attend(q, k, v, mask, backend="reference").astype(jnp.float32))
    fast = attend(q, k, v, mask, backend="jax")
    assert fast.dtype == dtype
    rows = visible_rows(numpy_mask(**CASES[case]))
    np.testing.assert_allclose(np.asarray(fast.astype(jnp.float32))[rows], ref[rows],
                               atol=atol, rtol=0)


def test_fully_masked_rows_are_zero():
    """A query with no visible key returns exact zeros on the reference backend."""
    q, k, v = random_qkv()
    case = CASES["all"]
    mask_BTS = numpy_mask(**case)
    hidden = ~visible_rows(mask_BTS)
    assert hidden.any() and not hidden.all()  # the case really has such rows
    out = np.asarray(attend(q, k, v, make_mask(**case), backend="reference"))
    assert np.all(out[hidden] == 0.0)
    assert np.all(np.abs(out[~hidden]).sum(-1) > 0)

    # A row whose keys are all padding.
    no_keys = AttentionMask(key_padding_BS=jnp.asarray([[True] * T, [False] * T]))
    out = np.asarray(attend(q, k, v, no_keys, backend="reference"))
    assert np.all(out[1] == 0.0)
    np.testing.assert_allclose(out[0], numpy_attention(q, k, v, np.ones((B, T, T), bool))[0],
                               atol=1e-5, rtol=0)


def _dropout(rate, rng):
    q, k, v = random_qkv()
    return np.asarray(attend(q, k, v, make_mask(padding=True), backend="reference",
                             dropout_rate=rate, dropout_rng=rng))


def test_reference_dropout():
    """Dropout changes the output, is a function of the rng, and is a no-op at rate 0."""
    plain = _dropout(0.0, None)
    key = jax.random.key(1)
    dropped = _dropout(0.5, key)
    assert np.all(np.isfinite(dropped))
    assert np.abs(dropped - plain).max() > 1e-2
    np.testing.assert_array_equal(dropped, _dropout(0.5, key))
    assert not np.array_equal(dropped, _dropout(0.5, jax.random.key(2)))
    np.testing.assert_array_equal(_dropout(0.0, key), plain)
