"""The "splash" backend (Pallas TPU kernel, run here in interpret mode) against the reference:
forward and gradients under every mask kind it expresses, the fallbacks, and whole models."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NORBERT4_TINY, example_batch, run_hf, simulated_devices_env

import bert_jax
from bert_jax.convert.families import BERT
from bert_jax.modeling import splash_attention
from bert_jax.modeling.attention import AttentionMask, attend

B, T, N, H = 2, 200, 2, 64  # T is no multiple of the kernel's 128-wide blocks
LENGTHS = (T, 150)  # real tokens per row


def _segments() -> np.ndarray:
    """Packed rows; padding keeps segment 0, so row 1's padding queries see no key at all."""
    ids = np.zeros((B, T), np.int32)
    ids[0, 90:] = 1
    ids[1, :70], ids[1, 70:LENGTHS[1]] = 1, 2
    return ids


CASES = {
    "padding": dict(padding=True),
    "segments": dict(padding=True, segments=True),
    "causal": dict(padding=True, causal=True),
    "left_padding_causal": dict(padding="left", causal=True),  # row 1 starts with empty rows
    "window": dict(padding=True, window=(16, 40)),
    "causal_window": dict(causal=True, window=(30, 5)),
    "window_ahead": dict(window=(-3, 10)),  # keys 3..10 ahead only: the last rows see none
    "all": dict(padding=True, segments=True, causal=True, window=(30, 5)),
}


def make_mask(padding=False, segments=False, causal=False, window=None) -> AttentionMask:
    """padding: True (on the right) or "left"."""
    kw = {}
    if padding:
        real_BS = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]
        kw["key_padding_BS"] = jnp.asarray(real_BS[:, ::-1] if padding == "left" else real_BS)
    if segments:
        kw["query_segment_ids_BT"] = kw["key_segment_ids_BS"] = jnp.asarray(_segments())
    return AttentionMask(**kw, causal=causal, window=window)


def random_qkv(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))


def splash(q, k, v, mask):
    return jax.jit(lambda q, k, v, mask: attend(q, k, v, mask, backend="splash"))(q, k, v, mask)


def as_np(x) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32))


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_fp32(case):
    """Every row within 1e-5, rows with no visible key included (exact zeros on both)."""
    q, k, v = random_qkv()
    mask = make_mask(**CASES[case])
    out = splash(q, k, v, mask)
    assert out.dtype == jnp.float32 and out.shape == (B, T, N, H)
    np.testing.assert_allclose(as_np(out), as_np(attend(q, k, v, mask)), atol=1e-5, rtol=0)


def test_rows_without_keys_are_zero():
    """These cases really have such rows, and the kernel gives exactly 0 there."""
    q, k, v = random_qkv()
    for case in ("all", "window_ahead", "left_padding_causal"):
        mask = make_mask(**CASES[case])
        hidden_BT = ~np.broadcast_to(mask.to_dense(T, T), (B, 1, T, T)).any(-1)[:, 0]
        assert hidden_BT.any() and not hidden_BT.all()
        assert np.all(as_np(splash(q, k, v, mask))[hidden_BT] == 0.0)


@pytest.mark.parametrize("case", ["segments", "all"])
def test_forward_matches_reference_bf16(case):
    """bf16 inputs: the kernel accumulates in fp32, so its output is the fp32 reference on the
    same inputs rounded once (within 1e-3 or half a bf16 ulp), and on average closer to it than
    the reference run in bf16, which rounds its probabilities to bf16 first."""
    q, k, v = random_qkv(jnp.bfloat16)
    mask = make_mask(**CASES[case])
    out = splash(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    exact = as_np(attend(*(x.astype(jnp.float32) for x in (q, k, v)), mask))
    np.testing.assert_allclose(as_np(out), exact, atol=1e-3, rtol=2.0 ** -8)
    reference_bf16 = as_np(attend(q, k, v, mask))
    assert np.abs(as_np(out) - exact).mean() < np.abs(reference_bf16 - exact).mean()


@pytest.mark.parametrize("case", ["segments", "causal_window", "all"])
def test_gradients_match_reference(case):
    """The kernel's custom VJP (dq and dkv kernels) against autodiff of the reference."""
    q, k, v = random_qkv()
    mask = make_mask(**CASES[case])
    cotangent = random_qkv(seed=1)[0]

    def grads(backend):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v, mask, backend=backend) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for ours, ref in zip(grads("splash"), grads("reference")):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=0)


def test_inexpressible_masks_fall_back_to_reference():
    """Per-row causal (GPT-BERT pretraining) and decoding positions run the reference path."""
    q, k, v = random_qkv()
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    for mask in (AttentionMask(causal_rows_B=jnp.asarray([True, False])),
                 AttentionMask(query_positions_BT=positions, key_positions_BS=positions,
                               causal=True)):
        assert not splash_attention.supports(mask)
        np.testing.assert_array_equal(as_np(attend(q, k, v, mask, backend="splash")),
                                      as_np(attend(q, k, v, mask)))


def test_kernel_built_once_per_shape_across_traces():
    """A new jit of the same shapes reuses the cached kernel, and can: its block tables are
    concrete arrays, not tracers leaked from the first trace."""
    q, k, v = random_qkv()
    mask = make_mask(padding=True, window=(7, 7))
    first = splash(q, k, v, mask)
    misses = splash_attention._kernel.cache_info().misses
    again = splash(q, k, v, mask)  # `splash` jits a new function: a new trace
    assert splash_attention._kernel.cache_info().misses == misses
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))


# Splash gradients on 4 simulated devices, examples over "data" and heads over "tensor", of
# the inputs in argv[1] (q, k, v, key padding, segment ids) under the "all" mask kind.
SHARDED_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
from bert_jax import sharding
from bert_jax.modeling.attention import AttentionMask, attend
q, k, v, padding, ids = np.load(sys.argv[1]).values()
mask = AttentionMask(key_padding_BS=padding, query_segment_ids_BT=ids, key_segment_ids_BS=ids,
                     causal=True, window=(30, 5))
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2))
split = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor"))
loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask, backend="splash") ** 2)
with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*jax.device_put((q, k, v), split))
np.savez(sys.argv[2], *grads)
"""


@pytest.mark.slow
def test_gradients_on_a_mesh(tmp_path):
    """Under a mesh the kernel runs per shard (shard_map) and the gradients are unchanged."""
    qkv, mask = random_qkv(), make_mask(**CASES["all"])
    np.savez(tmp_path / "inputs.npz", *qkv, mask.key_padding_BS, mask.query_segment_ids_BT)
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "inputs.npz"),
                             str(tmp_path / "grads.npz")],
                            env=simulated_devices_env(4), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask) ** 2),
                        argnums=(0, 1, 2))(*qkv)
    sharded = np.load(tmp_path / "grads.npz")
    for i, ref in enumerate(expected):
        np.testing.assert_allclose(sharded[f"arr_{i}"], np.asarray(ref), atol=1e-5, rtol=0)


def test_tiny_bert_matches_transformers(hf_dir):
    """A whole BERT on the splash backend: transformers' logits within the project's 1e-4 (the
    bar the reference backend meets in test_parity.py)."""
    torch_model, path = hf_dir("bert", "ForMaskedLM")
    batch = example_batch()
    logits = np.asarray(bert_jax.from_pretrained(path, attention_backend="splash")(**batch).logits)
    expected = run_hf(torch_model, batch).logits.numpy()
    real = batch["attention_mask"] == 1
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)


def test_kernel_first_built_in_a_scanned_init_serves_every_later_trace(hf_dir):
    """The train step's shardings come from `eval_shape` of the scanned model's init, which
    can be the first to ask for a kernel (and is inside Flax's `nn.scan` trace): the cached
    kernel must hold no tracer of it. Scanned and unrolled forwards then equal transformers."""
    torch_model, path = hf_dir("bert", "ForMaskedLM")
    batch = example_batch()
    expected = run_hf(torch_model, batch).logits.numpy()
    real = batch["attention_mask"] == 1
    config = bert_jax.from_pretrained(path).config
    splash_attention._kernel.cache_clear()  # the init's 1 token and these 11: one 128 kernel
    BERT.abstract_variables(dataclasses.replace(config, attention_backend="splash",
                                                scan_layers=True))
    for scan_layers in (True, False):
        model = bert_jax.from_pretrained(path, attention_backend="splash", scan_layers=scan_layers)
        logits = np.asarray(model(**batch).logits)
        np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm"])
def test_norbert4_fixture_matches(head):
    """Tiny NorBERT 4 (local and global sliding windows, bidirectional and causal) on the splash
    backend: the original implementation's logits within 1e-4 (as test_gpt_bert.py's bar)."""
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    batch = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    model = bert_jax.from_pretrained(NORBERT4_TINY / head, attention_backend="splash")
    logits = np.asarray(model(**batch).logits)
    expected = np.load(NORBERT4_TINY / "expected_exclusive_window.npz")[f"{head}.logits"]
    real = batch["attention_mask"] == 1
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)
