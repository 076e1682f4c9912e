"""Training checkpoints: a resumed run continues bit-for-bit, incomplete checkpoints are
ignored, and an incompatible model is refused."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import bert_jax
from bert_jax import sharding
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.train_step import create_train_state, make_train_step, state_shardings

CONFIG = bert_jax.preset("tiny", architectures=("BertForMaskedLM",), hidden_dropout_prob=0.1)
OPTIMIZER = optax.adamw(1e-3, weight_decay=0.01)


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids = rng.integers(5, 128, (4, 16)).astype(np.int32)
        yield {"input_ids": ids, "labels": np.where(rng.random(ids.shape) < 0.3, ids, -100)
               .astype(np.int32)}


def train(state, step_fn, data):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    with jax.set_mesh(mesh):
        for batch in data:
            state, _ = step_fn(state, batch)
    return state


def abstract(mesh, config=CONFIG):
    shardings = state_shardings(config, OPTIMIZER, mesh)
    state = jax.eval_shape(lambda: create_train_state(config, OPTIMIZER, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bit_identical(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    step_fn = make_train_step(CONFIG, OPTIMIZER, mesh)
    data = list(batches(6))
    uninterrupted = train(create_train_state(CONFIG, OPTIMIZER, mesh), step_fn, data)

    checkpoints = TrainCheckpoints(tmp_path / "ckpt")
    first_half = train(create_train_state(CONFIG, OPTIMIZER, mesh), step_fn, data[:3])
    checkpoints.save(3, first_half, {"examples_seen": 12})
    checkpoints.wait()
    checkpoints.close()

    reopened = TrainCheckpoints(tmp_path / "ckpt")
    assert reopened.latest_step() == 3
    state, record = reopened.restore(3, abstract(mesh))
    assert record == {"examples_seen": 12}
    assert int(state.step) == 3
    assert_same_tree(state, first_half)
    resumed = train(state, step_fn, data[3:])
    assert_same_tree(resumed.params, uninterrupted.params)
    assert_same_tree(resumed.opt_state, uninterrupted.opt_state)


def test_keeps_last_n_and_ignores_incomplete(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    state = create_train_state(CONFIG, OPTIMIZER, mesh)
    checkpoints = TrainCheckpoints(tmp_path / "ckpt", max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        checkpoints.save(step, state, {"step": step})
    checkpoints.wait()
    # A save killed half-way leaves only Orbax's temporary directory behind.
    (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234").mkdir()
    checkpoints.close()
    reopened = TrainCheckpoints(tmp_path / "ckpt")
    assert reopened.latest_step() == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_incompatible_model_is_refused(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    checkpoints = TrainCheckpoints(tmp_path / "ckpt", async_save=False)
    checkpoints.save(1, create_train_state(CONFIG, OPTIMIZER, mesh), {})
    checkpoints.wait()
    bigger = bert_jax.preset("tiny", architectures=("BertForMaskedLM",), hidden_size=64)
    with pytest.raises(bert_jax.BertJaxError, match="cannot be restored"):
        checkpoints.restore(1, abstract(mesh, bigger))
