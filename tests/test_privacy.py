"""DP-SGD: per-example clipping against plain per-example `jax.grad`, the private step against
the plain step, its noise against N(0, (sigma * C / B)^2), padding rows, 1 vs 16 devices; the
accountant against `dp_accounting`, Opacus and the published figures; the samplers.

Run as a script, this file is the 16-device side of the sharding test:
    XLA_FLAGS=--xla_force_host_platform_device_count=16 python test_privacy.py OUT.npz
"""

from __future__ import annotations

import math
import subprocess
import sys

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from conftest import simulated_devices_env
from dp_accounting import pld, rdp
from scipy import stats

import bert_jax
from bert_jax import sharding
from bert_jax.training import privacy
from bert_jax.training import run as training_run
from bert_jax.training.optimizer import OptimizerConfig
from bert_jax.training.privacy import DpConfig, clipped_gradients, make_dp_train_step
from bert_jax.training.train_step import create_train_state, make_train_step, model_loss

# One layer (compiles fast); dropout off, so the private and the plain step see the same
# function; an MLP width (48) that the 16-device mesh's tensor=2 divides.
CONFIG = bert_jax.preset("tiny", architectures=("BertForSequenceClassification",),
                         num_hidden_layers=1, intermediate_size=48, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
OPTIMIZER = optax.sgd(1.0)  # params - new params = the gradient the optimizer was given
ROWS, LENGTH = 16, 12
# Clip far above any example's norm (~1) and noise std sigma * C / B = 6.25e-3: small enough to
# subtract exactly in fp32, large enough to measure.
PLAN = DpConfig(clip_norm=1e3, noise_multiplier=1e-4, delta=1e-5, sampling="fixed",
                chunk_size=8).plan(dataset_size=1000, batch_size=ROWS, steps=100)
PADDED = 10  # rows >= PADDED of the padded batch are padding, with garbage in them
NAN_ROW = 9  # a real example whose loss is 0/0 (no labels): it must drop out, alone


def make_batch(kind: str) -> dict:
    """"full": 16 examples; "empty": all masked; "padded": examples 0-8 kept, 9 without a label
    (non-finite loss), 10-15 padding with random ids and no labels."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, CONFIG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    lengths = rng.integers(4, LENGTH + 1, ROWS)
    batch = {"input_ids": ids,
             "attention_mask": (np.arange(LENGTH) < lengths[:, None]).astype(np.int32),
             "labels": rng.integers(0, 2, ROWS).astype(np.int32),
             "example_mask": np.full(ROWS, kind != "empty")}
    if kind == "padded":
        batch["example_mask"][PADDED:] = False
        batch["labels"][NAN_ROW:] = -100
        batch["input_ids"][PADDED:] = rng.integers(0, CONFIG.vocab_size, (ROWS - PADDED, LENGTH))
    return batch


def dp_step(mesh, kind: str):
    """(params after one private step from the seed-0 state, metrics)."""
    with jax.set_mesh(mesh):
        state = create_train_state(CONFIG, OPTIMIZER, mesh, seed=0)
        state, metrics = make_dp_train_step(CONFIG, OPTIMIZER, mesh, PLAN)(state, make_batch(kind))
    return jax.device_get(state.params), jax.device_get(metrics)


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


@pytest.fixture(scope="module")
def run():
    """One compiled private step, run from the same state on each batch kind, and the plain
    pieces to check it against."""
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    with jax.set_mesh(mesh):
        state = jax.device_get(create_train_state(CONFIG, OPTIMIZER, mesh, seed=0))
        step = make_dp_train_step(CONFIG, OPTIMIZER, mesh, PLAN)
        out = {kind: jax.device_get(step(state, make_batch(kind))) for kind in
               ("full", "empty", "padded")}
        plain = make_train_step(CONFIG, OPTIMIZER, mesh)
        full = {k: v for k, v in make_batch("full").items() if k != "example_mask"}
        out["plain"] = jax.device_get(plain(state, full))
    loss_fn = model_loss(CONFIG)
    grad_one = jax.jit(jax.value_and_grad(loss_fn))
    batch = make_batch("padded")
    per_example = [grad_one(state.params, {k: v[i:i + 1] for k, v in batch.items()
                                           if k != "example_mask"}, jax.random.key(0))
                   for i in range(ROWS)]
    return {"state": state, "loss_fn": loss_fn, "per_example": per_example,
            **{kind: (flat(s.params), m) for kind, (s, m) in out.items()}}


def test_clipped_gradients_are_bounded_and_unclipped_ones_are_jax_grad(run):
    batch = {k: v for k, v in make_batch("padded").items() if k != "example_mask"}
    expected = [flat(g) for _, g in run["per_example"][:PADDED]]
    norms = np.array([np.linalg.norm(g) for g in expected[:NAN_ROW]])
    clip = float(np.median(norms))  # half the examples are clipped
    keep = np.arange(ROWS) != 3  # drop one example by mask, NAN_ROW by its loss
    losses, grads, got_norms, kept = jax.jit(clipped_gradients, static_argnums=0)(
        run["loss_fn"], run["state"].params, batch, jax.random.split(jax.random.key(0), ROWS),
        keep, clip)
    grads = [flat(jax.tree.map(lambda g: g[i], grads)) for i in range(ROWS)]
    assert list(np.flatnonzero(~np.asarray(kept))) == [3, *range(NAN_ROW, ROWS)]
    assert (norms < clip).sum() >= 3 and (norms > clip).sum() >= 3
    for i, grad in enumerate(grads):
        assert np.linalg.norm(grad) <= clip * (1 + 1e-6), i
        if not kept[i]:
            assert not grad.any(), i
            continue
        np.testing.assert_allclose(got_norms[i], norms[i], rtol=1e-5)
        np.testing.assert_allclose(losses[i], run["per_example"][i][0], rtol=1e-6)
        scale = min(1.0, clip / norms[i])
        np.testing.assert_allclose(grad, expected[i] * scale, atol=1e-6, err_msg=str(i))


def test_private_step_without_clipping_or_noise_is_the_plain_step(run):
    """Nothing is clipped at C = 1e3, and the noise is the same on any batch of the step, so
    the full batch's update minus the empty batch's (noise only) is the mean gradient."""
    (full, metrics), (noise_only, _), (plain, plain_metrics) = run["full"], run["empty"], \
        run["plain"]
    start = flat(run["state"].params)
    np.testing.assert_allclose(noise_only - full, start - plain, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    assert metrics["clipped_fraction"] == 0 and metrics["examples"] == ROWS
    assert not metrics["skipped"]


def test_noise_has_the_right_distribution(run):
    """On an all-padding batch the update is noise / B ~ N(0, (sigma * C / B)^2) per param."""
    noise, metrics = run["empty"]
    noise = flat(run["state"].params) - noise
    std = PLAN.noise_multiplier * PLAN.config.clip_norm / PLAN.batch_size
    n = noise.size
    assert n > 10_000
    # Standard errors: std / sqrt(n) for the mean, std / sqrt(2n) for the std; 5 of them.
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)
    assert stats.kstest(noise / std, "norm").pvalue > 1e-3
    assert metrics["examples"] == 0 and metrics["loss"] == 0 and not metrics["skipped"]


def test_padding_rows_and_a_nonfinite_example_change_nothing_else(run):
    padded, metrics = run["padded"]
    noise_only, _ = run["empty"]
    expected = sum(flat(g) for _, g in run["per_example"][:NAN_ROW]) / PLAN.batch_size
    np.testing.assert_allclose(noise_only - padded, expected, atol=1e-6)
    assert metrics["examples"] == PADDED and metrics["nonfinite_examples"] == 1
    np.testing.assert_allclose(
        metrics["loss"], np.mean([loss for loss, _ in run["per_example"][:NAN_ROW]]), rtol=1e-6)
    assert not metrics["skipped"]


@pytest.mark.slow
def test_one_device_equals_sixteen(run, tmp_path):
    out = tmp_path / "sixteen.npz"
    result = subprocess.run([sys.executable, __file__, str(out)], env=simulated_devices_env(16),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sixteen = np.load(out)
    assert int(sixteen["devices"]) == 16
    np.testing.assert_allclose(sixteen["params"], run["padded"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(sixteen["loss"], run["padded"][1]["loss"], rtol=1e-5)


# Abadi et al. 2016 (Sec. 3.1: q = 0.01, sigma = 4, 10k steps, delta = 1e-5 -> eps 1.26) and the
# TensorFlow Privacy MNIST tutorial (q = 256 / 60000, sigma = 1.12, 60 epochs -> eps 2.92),
# with what Opacus 1.6.0's RDPAccountant reports for them (its default orders).
PUBLISHED = [(0.01, 4.0, 10_000, 1.26, 1.0354900660362476),
             (256 / 60_000, 1.12, 60 * 60_000 // 256, 2.92, 2.5185897819186374)]


@pytest.mark.parametrize("rate,sigma,steps,published,opacus", PUBLISHED)
def test_epsilon_matches_dp_accounting_opacus_and_the_published_figure(rate, sigma, steps,
                                                                       published, opacus):
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = privacy.epsilon(sigma, rate, steps, 1e-5)
    assert ours == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(1e-5), rel=1e-9)
    assert ours == pytest.approx(opacus, rel=1e-6)
    assert privacy.epsilon(sigma, rate, steps, 1e-5, "pld") == pytest.approx(
        pld.PLDAccountant().compose(event).get_epsilon(1e-5), rel=1e-9)
    # The papers converted RDP to (eps, delta) with eps = min(rdp - log(delta) / (order - 1))
    # over TF Privacy's orders; the same RDP curve gives their figure that way.
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    curve = rdp.RdpAccountant(orders).compose(event)
    classic = np.min(curve.rdp - math.log(1e-5) / (curve.orders - 1))
    assert round(classic, 2) == published and ours < published


def test_noise_multiplier_for_inverts_epsilon():
    rate, steps, target = 64 / 20_000, 3_000, 3.0
    sigma = privacy.noise_multiplier_for(target, 1e-5, rate, steps)
    assert target - 0.01 < privacy.epsilon(sigma, rate, steps, 1e-5) <= target
    assert privacy.epsilon(sigma * 0.999, rate, steps, 1e-5) > target


def test_plan_picks_the_noise_for_a_target_epsilon():
    plan = DpConfig(clip_norm=1.0, target_epsilon=2.0, delta=1e-6).plan(
        dataset_size=10_000, batch_size=50, steps=400)
    assert plan.noise_multiplier == pytest.approx(
        privacy.noise_multiplier_for(2.0, 1e-6, plan.sample_rate, 400), abs=1e-5)
    assert 1.99 < plan.epsilon() <= 2.0
    assert plan.epsilon(steps=100) < plan.epsilon()


def test_fixed_size_sampling_is_accounted_with_replace_one_neighbours():
    """Swapping one example moves the clipped sum by up to 2C: the Gaussian's multiplier
    relative to that sensitivity is sigma / 2."""
    plan = DpConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-6, sampling="fixed").plan(
        dataset_size=10_000, batch_size=50, steps=400)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        10_000, 50, dp_accounting.GaussianDpEvent(0.5)), 400)
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert plan.epsilon() == pytest.approx(accountant.compose(event).get_epsilon(1e-6), rel=1e-9)
    # Replace-one is about two add/remove steps: never cheaper than Poisson at the same rate.
    assert plan.epsilon() > privacy.epsilon(1.0, plan.sample_rate, 400, 1e-6)


def test_poisson_sampler():
    plan = DpConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, chunk_size=4).plan(
        dataset_size=2_000, batch_size=40, steps=10_000, multiple_of=8)
    n, q = plan.dataset_size, plan.sample_rate
    assert plan.rows % 8 == 0
    # The rows hold every sample of the run but with probability OVERFLOW_PROBABILITY, and
    # no fewer rows (rounded up to the multiple) would.
    assert stats.binom.sf(plan.rows, n, q) * plan.steps <= privacy.OVERFLOW_PROBABILITY
    assert stats.binom.sf(plan.rows - 8, n, q) * plan.steps > privacy.OVERFLOW_PROBABILITY
    counts = []
    for step in range(400):
        indices, mask = plan.sample(seed=7, step=step)
        assert indices.shape == mask.shape == (plan.rows,)
        chosen = indices[mask]
        assert len(set(chosen)) == len(chosen) and chosen.min() >= 0 and chosen.max() < n
        assert not indices[~mask].any()
        # Examples fill chunk 0 (rows 0, groups, ...), then chunk 1, ...: padding comes last.
        by_chunk = mask.reshape(4, -1).T.ravel()
        assert by_chunk[:len(chosen)].all() and not by_chunk[len(chosen):].any()
        counts.append(len(chosen))
    counts = np.array(counts)
    mean, var = n * q, n * q * (1 - q)
    assert abs(counts.mean() - mean) < 5 * math.sqrt(var / len(counts))
    assert abs(counts.var() - var) < 5 * var * math.sqrt(2 / (len(counts) - 1))
    again = plan.sample(seed=7, step=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, plan.sample(seed=7, step=3)))
    assert not np.array_equal(again[0], plan.sample(seed=7, step=4)[0])


def test_fixed_sampler():
    plan = DpConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, sampling="fixed").plan(
        dataset_size=100, batch_size=32, steps=5, multiple_of=8)
    indices, mask = plan.sample(seed=0, step=0)
    assert plan.rows == 32 and mask.all() and len(set(indices)) == 32


@pytest.mark.parametrize("fields,needle", [
    (dict(clip_norm=1.0, delta=1e-5), "exactly one of noise_multiplier and target_epsilon"),
    (dict(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, target_epsilon=1.0), "exactly one"),
    (dict(clip_norm=0.0, delta=1e-5, noise_multiplier=1.0), "clip_norm=0.0 must be"),
    (dict(clip_norm=1.0, delta=1.0, noise_multiplier=1.0), "delta=1.0 must be < 1"),
    (dict(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, sampling="shuffle"), "not one of"),
    (dict(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, sampling="fixed", accountant="pld"),
     "use rdp"),
    (dict(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, chunk_size=0), "chunk_size"),
])
def test_bad_config(fields, needle):
    with pytest.raises(bert_jax.BertJaxError, match=needle):
        DpConfig(**fields)


def test_bad_plan_and_batch():
    dp = DpConfig(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                  chunk_size=4)
    with pytest.raises(bert_jax.BertJaxError, match="not a multiple of 4"):
        dp.plan(dataset_size=100, batch_size=6, steps=5, multiple_of=2)
    with pytest.raises(bert_jax.BertJaxError, match="batch size 200 must be in"):
        dp.plan(dataset_size=100, batch_size=200, steps=5)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    state = jax.eval_shape(lambda: create_train_state(CONFIG, OPTIMIZER, mesh))
    batch = {k: jax.ShapeDtypeStruct((8,) + v.shape[1:], v.dtype)
             for k, v in make_batch("full").items()}
    with jax.set_mesh(mesh), pytest.raises(bert_jax.BertJaxError, match="needs the plan's 16"):
        make_dp_train_step(CONFIG, OPTIMIZER, mesh, PLAN).trace(state, batch)
    accumulating = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=5,
                                   accumulation_steps=2)
    with pytest.raises(bert_jax.BertJaxError, match="DP-SGD runs take 1"):
        training_run.train_step(CONFIG, accumulating, mesh, PLAN)


if __name__ == "__main__":
    params, metrics = dp_step(sharding.make_mesh(sharding.MeshConfig(2, 4, 2)), "padded")
    np.savez(sys.argv[1], params=flat(params), loss=metrics["loss"], devices=len(jax.devices()))
