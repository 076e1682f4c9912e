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


# --- the fast backends and attention dropout ----------------------------------------------------

FAST_BACKENDS = ("jax", "cudnn", "splash")


def tiny_model(family: str, backend: str, dropout: float):
    """A tiny BERT or GPT-BERT masked LM on `backend` with attention dropout `dropout`."""
    import bert_jax
    from bert_jax.convert.families import BERT, GPT_BERT

    dtype = "bfloat16" if backend == "cudnn" else "float32"  # cuDNN's flash attention needs it
    if family == "bert":
        config = bert_jax.preset("tiny", attention_backend=backend, dtype=dtype,
                                 attention_probs_dropout_prob=dropout)
        return BERT.build_module(config), config
    config = bert_jax.preset("norbert4-tiny", attention_backend=backend, dtype=dtype,
                             attention_dropout=dropout)
    return GPT_BERT.build_module(config), config


def training_trace(module, **inputs):
    """Trace (nothing runs) a training forward: init and apply with dropout on."""
    ids = jnp.ones((2, 16), jnp.int32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: module.init(rngs, ids, deterministic=False, **inputs))


@pytest.mark.parametrize("family", ["bert", "gpt-bert"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backends_refuse_attention_dropout_in_training(family, backend):
    """Training on a backend without attention dropout is refused at trace time, naming the
    settings to change; inference (dropout off) on the same config is not."""
    import bert_jax

    module, config = tiny_model(family, backend, dropout=0.1)
    field = config.ATTENTION_DROPOUT_FIELD
    with pytest.raises(bert_jax.BertJaxError) as err:
        training_trace(module)
    assert str(err.value) == (f"attention_backend {backend!r} has no attention dropout: set "
                              f"{field}: 0 or attention_backend: reference")
    if not needs_gpu(backend):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((2, 16), jnp.int32)))


def needs_gpu(backend: str) -> bool:
    """cuDNN's kernel cannot even be traced without a GPU."""
    return backend == "cudnn" and jax.default_backend() != "gpu"


@pytest.mark.parametrize("family", ["bert", "gpt-bert"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backends_train_without_attention_dropout(family, backend):
    """With attention dropout 0 a training forward runs on every backend (on the CPU, cuDNN's
    gets past the dropout check to JAX's cuDNN wrapper, which then needs a GPU)."""
    import bert_jax

    module, _ = tiny_model(family, backend, dropout=0.0)
    if needs_gpu(backend):
        with pytest.raises(Exception) as err:
            training_trace(module)
        assert not isinstance(err.value, bert_jax.BertJaxError)
        return
    ids = jnp.ones((2, 16), jnp.int32)
    variables = module.init(jax.random.key(0), ids)
    out = module.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.all(np.isfinite(np.asarray(out.logits, np.float32)))


def test_reference_backend_still_trains_with_attention_dropout():
    module, _ = tiny_model("bert", "reference", dropout=0.1)
    training_trace(module)


@pytest.mark.parametrize("backend,instead", [("splash", "the reference backend"),
                                             ("cudnn", "XLA's dot_product_attention")])
def test_fallback_is_logged_once(backend, instead, caplog, monkeypatch):
    """A mask the backend cannot express (per-row causal: GPT-BERT pretraining) runs on another
    path, and says so once per process, however many layers and traces hit it."""
    from bert_jax.modeling import attention

    monkeypatch.setattr(attention, "_FALLBACKS_LOGGED", set())
    q, k, v = random_qkv(jnp.bfloat16 if backend == "cudnn" else jnp.float32)
    mask = AttentionMask(key_padding_BS=make_mask(padding=True).key_padding_BS,
                         causal_rows_B=jnp.asarray([True, False]))
    with caplog.at_level("WARNING", logger="bert_jax"):
        for _ in range(3):
            jax.eval_shape(lambda q, k, v: attend(q, k, v, mask, backend=backend), q, k, v)
    records = [r for r in caplog.records if r.name == "bert_jax"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert f"attention_backend '{backend}' cannot express per-row causal" in message
    assert message.endswith(f"runs on {instead}")


def test_gpt_bert_pretraining_on_splash_falls_back_and_logs_once(caplog, monkeypatch):
    """GPT-BERT's hybrid objective (causal rows) on splash: the reference's numbers, one log."""
    import bert_jax
    from bert_jax.convert.families import GPT_BERT
    from bert_jax.modeling import attention

    monkeypatch.setattr(attention, "_FALLBACKS_LOGGED", set())
    outs = []
    with caplog.at_level("WARNING", logger="bert_jax"):
        for backend in ("reference", "splash"):
            config = bert_jax.preset("norbert4-tiny", architectures=("GptBertForPreTraining",),
                                     attention_backend=backend)
            module = GPT_BERT.build_module(config)
            ids = jnp.asarray(np.random.default_rng(0).integers(5, 256, (2, 16)), jnp.int32)
            params = GPT_BERT.init_params(config)
            outs.append(module.apply({"params": params}, ids, labels=ids,
                                     causal_rows=jnp.asarray([True, False]), deterministic=False,
                                     rngs={"dropout": jax.random.key(1)}).loss)
    np.testing.assert_allclose(float(outs[1]), float(outs[0]), atol=1e-6, rtol=0)
    assert len([r for r in caplog.records if "cannot express" in r.getMessage()]) == 1
