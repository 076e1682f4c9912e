"""Gradient accumulation is one large batch: k micro-batches of B rows inside one train step
give the loss, gradients and update of one step on k x B rows (masked-LM losses weighted by
their masked tokens), and the logged learning rate is the schedule at the update count."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import bert_jax
from bert_jax import sharding
from bert_jax.errors import BertJaxError
from bert_jax.training.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule
from bert_jax.training.recipe import PretrainOptimizer
from bert_jax.training.train_step import (
    accumulated_loss_and_grads,
    create_train_state,
    make_train_step,
)

ROWS, LENGTH, STEPS = 16, 12, 4
SCHEDULE = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10, clip_norm=1.0)


def bert_batch(rng):
    ids = rng.integers(5, 99, (ROWS, LENGTH)).astype(np.int32)
    # Rows with very different numbers of masked tokens: a mean of micro-batch means would
    # weigh them wrongly.
    share = np.tile([0.05, 0.6, 0.2, 0.9], ROWS // 4)[:, None]  # micro-batch j: rows j::4
    labels = np.where(rng.random(ids.shape) < share, ids, -100).astype(np.int32)
    labels[:, 1] = ids[:, 1]  # every row has one
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "labels": labels,
            "next_sentence_label": rng.integers(0, 2, ROWS).astype(np.int32)}


def gpt_bert_batch(rng):
    ids = rng.integers(5, 99, (ROWS, LENGTH)).astype(np.int32)
    causal_rows = np.arange(ROWS) % 5 == 0  # micro-batches hold 0 to 2 causal rows
    masked = np.where(rng.random(ids.shape) < 0.3, ids, -100)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "labels": np.where(causal_rows[:, None], ids, masked).astype(np.int32),
            "causal_rows": causal_rows}


CASES = {
    "bert-mlm-nsp": (bert_jax.preset("tiny", architectures=("BertForPreTraining",),
                                     vocab_size=99, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0), bert_batch),
    "gpt-bert": (bert_jax.preset("norbert4-tiny", architectures=("GptBertForPreTraining",),
                                 vocab_size=99, embedding_dropout=0.0), gpt_bert_batch),
}


@pytest.mark.parametrize("case", CASES)
def test_accumulated_step_equals_one_large_batch(case):
    config, make_batch = CASES[case]
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    batch = make_batch(np.random.default_rng(0))
    optimizer = build_optimizer(SCHEDULE)
    state = create_train_state(config, optimizer, mesh, seed=1)
    key = jax.random.key(3)
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(accumulated_loss_and_grads(config, 1, mesh))(
            state.params, batch, key)
        micro_loss, micro_grads = jax.jit(accumulated_loss_and_grads(config, STEPS, mesh))(
            state.params, batch, key)
        np.testing.assert_allclose(micro_loss, loss, rtol=1e-6)
        for ours, large in zip(jax.tree.leaves(micro_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(ours, large, rtol=1e-5, atol=1e-6)

        # The plain mean of the micro-batches' own gradients is not the large batch's: the
        # test sees the weighting.
        own = jax.jit(accumulated_loss_and_grads(config, 1, mesh))
        micro = [own(state.params, jax.tree.map(lambda x, i=i: x[i::STEPS], batch), key)[1]
                 for i in range(STEPS)]
        mean = jax.tree.map(lambda *g: sum(g) / STEPS, *micro)
        assert max(float(np.max(np.abs(m - g))) for m, g in zip(
            jax.tree.leaves(mean), jax.tree.leaves(grads), strict=True)) > 1e-3

        large = make_train_step(config, optimizer, mesh)
        accumulated = make_train_step(config, optimizer, mesh, accumulation_steps=STEPS)
        copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # noqa: E731 (steps donate)
        after_large, metrics_large = large(copy(state), batch)
        after_micro, metrics_micro = accumulated(copy(state), batch)
    np.testing.assert_allclose(metrics_micro["loss"], metrics_large["loss"], rtol=1e-6)
    for ours, theirs in zip(jax.tree.leaves(after_micro.params),
                            jax.tree.leaves(after_large.params), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert int(after_micro.step) == 1


def test_logged_learning_rate_is_the_schedule_at_the_update():
    config, make_batch = CASES["bert-mlm-nsp"]
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    optimizer = build_optimizer(SCHEDULE)
    schedule = learning_rate_schedule(SCHEDULE)
    step = make_train_step(config, optimizer, mesh, schedule, accumulation_steps=STEPS)
    state = create_train_state(config, optimizer, mesh)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        for update in range(4):
            state, metrics = step(state, make_batch(rng))
            assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(update)))
    assert float(schedule(3)) != float(schedule(3 * STEPS))  # the old micro-step count differs


def test_schedule_length_follows_the_run():
    assert PretrainOptimizer().optimizer_config(500).total_steps == 500
    assert PretrainOptimizer(total_steps=900).optimizer_config(500).total_steps == 900
    with pytest.raises(BertJaxError, match="total_steps=100 is less than train.steps=500"):
        PretrainOptimizer(warmup_steps=10, total_steps=100).optimizer_config(500)
