"""The training loop never waits for the device between two log / eval / save steps, and
still stops a run of non-finite losses (read on those steps)."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from jax._src.array import ArrayImpl

import bert_jax
from bert_jax import sharding
from bert_jax.errors import BertJaxError
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.loop import LoopSettings, Throughput, train_loop
from bert_jax.training.run_log import ExampleIdLog, RunLog
from bert_jax.training.train_step import create_train_state, make_train_step

CONFIG = bert_jax.preset("tiny", architectures=("BertForMaskedLM",))
OPTIMIZER = optax.adamw(1e-3)


def batch(rng) -> dict:
    ids = rng.integers(5, 99, (4, 16)).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.3, ids, -100).astype(np.int32)
    labels[:, 0] = ids[:, 0]
    mask = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "example_id": np.arange(4, dtype=np.int64)}


def run_loop(tmp_path, data, settings: LoopSettings, step_fn=None):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    state = create_train_state(CONFIG, OPTIMIZER, mesh)
    checkpoints = TrainCheckpoints(tmp_path / "checkpoints")
    log = RunLog(tmp_path, enabled=True)
    try:
        return train_loop(state, step_fn or make_train_step(CONFIG, OPTIMIZER, mesh), data,
                          settings=settings, mesh=mesh,
                          batch_sharding=sharding.batch_sharding(mesh, 1),
                          checkpoints=checkpoints, record=lambda: {}, log=log,
                          consumed=ExampleIdLog(tmp_path, enabled=False),
                          throughput=Throughput(CONFIG, state.params, 16), progress=False)
    finally:
        checkpoints.close()
        log.close()


def test_steps_between_log_steps_never_read_the_device(tmp_path, monkeypatch):
    """Every device -> host read goes through `ArrayImpl._value`; count them per step. (On
    TPU / GPU `jax.transfer_guard_device_to_host("disallow")` would also catch a read; on the
    CPU, whose arrays live in host memory, it does not fire, hence the count.)"""
    reads = [0]
    value = ArrayImpl._value

    def counted(self):
        reads[0] += 1
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    reads_before_step = []

    def data():
        rng = np.random.default_rng(0)
        while True:
            reads_before_step.append(reads[0])
            yield batch(rng)

    run_loop(tmp_path, data(), LoopSettings(steps=12, log_every=4, eval_every=100,
                                            save_every=100, max_bad_steps=3))
    per_step = np.diff(reads_before_step)  # reads during steps 1 .. 11
    for step, count in enumerate(per_step, start=1):
        if step % 4:
            assert count == 0, f"step {step} read {count} device arrays"
        else:
            assert count > 0, f"log step {step} read nothing: the count sees no reads"


def test_non_finite_losses_in_a_row_stop_the_run_at_the_next_log_step(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    step_fn = make_train_step(CONFIG, OPTIMIZER, mesh)

    def poisoned(state, global_batch):  # from step 3 on, every step is skipped
        bad = int(state.step) >= 2  # (this read is the test's own)
        state, metrics = step_fn(state, global_batch)
        return state, {**metrics, "skipped": metrics["skipped"] | bad}

    def data():
        rng = np.random.default_rng(0)
        while True:
            yield batch(rng)

    with pytest.raises(BertJaxError, match="4 non-finite losses in a row by step 6"):
        run_loop(tmp_path, data(), LoopSettings(steps=20, log_every=6, eval_every=100,
                                                save_every=100, max_bad_steps=3),
                 step_fn=poisoned)
    assert not (tmp_path / "checkpoints" / "6").exists()
