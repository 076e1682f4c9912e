"""The training loop that `pretrain` and `finetune` share (set up around it by `run`).

`train_loop` runs the steps with a progress bar (loss, tokens/s), logging on process 0
(`RunLog`, with throughput and model FLOPs utilisation), periodic evaluation, a guard against
non-finite losses, checkpoints every `save_every` steps and at the end, and a SIGTERM handler
that saves before exiting (TPU spot preemption). What differs between the two trainers (the
model, the data, what evaluation means) comes in as arguments.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from bert_jax.errors import BertJaxError
from bert_jax.training import flops
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.run_log import ExampleIdLog, RunLog
from bert_jax.training.train_step import TrainState


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    steps: int
    log_every: int
    eval_every: int
    save_every: int
    max_bad_steps: int  # stop after this many non-finite losses in a row


def train_loop(state: TrainState, step_fn, data, *, settings: LoopSettings, mesh, batch_sharding,
               checkpoints: TrainCheckpoints, record: Callable[[], dict], log: RunLog,
               consumed: ExampleIdLog, throughput: Throughput,
               evaluate: Callable[[TrainState], dict] | None = None, eval_at_start: bool = False,
               logged_with: Callable[[int], dict] | None = None,
               progress: bool = True, desc: str = "train") -> tuple[TrainState, dict, bool]:
    """Train from `state.step` to `settings.steps` -> (state, last logged metrics, whether a
    SIGTERM stopped the run early).

    `data` yields this process's share of each batch (NumPy, with an `example_id` row id);
    `step_fn(state, global batch)` -> (state, metrics with "loss" and "skipped");
    `evaluate(state)` -> metrics, run every `eval_every` steps, at the end, and with
    `eval_at_start` before a fresh run's first step; `record()` -> the JSON saved with each
    checkpoint (e.g. the data iterator's state); `consumed` gets each step's example ids;
    `logged_with(step)` -> host-side figures logged with each step's metrics (e.g. DP-SGD's
    epsilon so far).
    """
    out = checkpoints.directory.parent
    start_step = int(state.step)
    preemption = _Preemption()
    bar = tqdm(total=settings.steps, initial=start_step, desc=desc, unit="step",
               disable=not (progress and jax.process_index() == 0))
    metrics, bad_in_a_row = {}, 0
    try:
        with jax.set_mesh(mesh):
            if evaluate is not None and eval_at_start and start_step == 0:
                log.write({"step": 0, **evaluate(state)})
            for step in range(start_step, settings.steps):
                local_batch = next(data)
                state, step_metrics = step_fn(state, global_batch(local_batch, batch_sharding))
                throughput.count(local_batch["attention_mask"])
                consumed.write(step + 1, local_batch["example_id"])
                bad_in_a_row = bad_in_a_row + 1 if bool(step_metrics["skipped"]) else 0
                if bad_in_a_row >= settings.max_bad_steps:
                    raise BertJaxError(f"{bad_in_a_row} non-finite losses in a row at step "
                                       f"{step + 1}; the last good checkpoint is kept in {out}")
                done = step + 1
                if done % settings.log_every == 0 or done == settings.steps:
                    metrics = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                               **throughput.report(),
                               **(logged_with(done) if logged_with is not None else {})}
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    tok_s=f"{metrics['tokens_per_second']:,.0f}")
                    log.write(metrics)
                if evaluate is not None and (done % settings.eval_every == 0
                                             or done == settings.steps):
                    metrics = {"step": done, **evaluate(state)}
                    log.write(metrics)
                if done % settings.save_every == 0 or preemption.requested:
                    checkpoints.save(done, state, record())
                bar.update(1)
                if preemption.requested:
                    break
            if not preemption.requested:
                checkpoints.save(settings.steps, state, record())
    finally:
        bar.close()
        checkpoints.wait()
        preemption.restore()
    return state, metrics, preemption.requested


def global_batch(local_batch: dict, batch_sharding, host_only=("example_id",)) -> dict:
    """This process's share of a batch -> global arrays over the mesh (multi-host safe);
    the `host_only` bookkeeping stays behind."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local_batch.items() if k not in host_only}


class Throughput:
    """Tokens/s since the last report, over all processes, and MFU where the chip is known.

    Each process counts its own real (non-padding) tokens; the global figure scales that by
    the process count, as every process gets an equal share of the batch."""

    def __init__(self, config, params, seq_len: int):
        num_params = sum(x.size for x in jax.tree.leaves(params))
        self._flops_per_token = flops.training_flops_per_token(config, num_params, seq_len)
        self._peak = flops.peak_flops()
        self._tokens, self._clock = 0, time.perf_counter()

    def count(self, attention_mask) -> None:
        self._tokens += int(np.sum(attention_mask)) * jax.process_count()

    def report(self) -> dict:
        elapsed = time.perf_counter() - self._clock
        result = {"tokens_per_second": self._tokens / elapsed}
        if self._peak is not None:
            result["mfu"] = (result["tokens_per_second"] * self._flops_per_token
                             / (self._peak * jax.device_count()))
        self._tokens, self._clock = 0, time.perf_counter()
        return result


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)

