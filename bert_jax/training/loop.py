"""The training loop that `pretrain` and `finetune` share (set up around it by `run`).

`train_loop` runs the steps with a progress bar (loss, tokens/s), logging on process 0
(`RunLog`, with throughput and model FLOPs utilisation), periodic evaluation, a guard against
non-finite losses, checkpoints every `save_every` steps and at the end, and a save-and-stop on
SIGTERM (TPU spot preemption) at a step every process agrees on. What differs between the
two trainers (the model, the data, what evaluation means) comes in as arguments.

The host never waits for the device between two log / eval / save steps: step metrics, the
non-finite counter included, stay on the device until then, so the host assembles the next
batches while the chips compute.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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
    start_step = int(state.step)
    preemption = Preemption()
    bad_steps = _NonFiniteSteps(settings.max_bad_steps, checkpoints.directory.parent)
    bar = tqdm(total=settings.steps, initial=start_step, desc=desc, unit="step",
               disable=not (progress and jax.process_index() == 0))
    metrics, stopped = {}, False
    try:
        with jax.set_mesh(mesh):
            if evaluate is not None and eval_at_start and start_step == 0:
                log.write({"step": 0, **evaluate(state)})
            for step in range(start_step, settings.steps):
                local_batch = next(data)
                state, step_metrics = step_fn(state, global_batch(local_batch, batch_sharding))
                throughput.count(local_batch["attention_mask"])
                consumed.write(step + 1, local_batch["example_id"])
                bad_steps.add(step_metrics["skipped"])
                done = step + 1
                last = done == settings.steps
                log_now = done % settings.log_every == 0 or last
                eval_now = evaluate is not None and (done % settings.eval_every == 0 or last)
                if log_now or eval_now:
                    bad_steps.check(done)  # never log, evaluate or save past a bad run
                if log_now:
                    metrics = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                               **throughput.report(),
                               **(logged_with(done) if logged_with is not None else {})}
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    tok_s=f"{metrics['tokens_per_second']:,.0f}")
                    log.write(metrics)
                if eval_now:
                    metrics = {"step": done, **evaluate(state)}
                    log.write(metrics)
                stopped = preemption.reached(done)
                if done % settings.save_every == 0 or last or stopped:
                    bad_steps.check(done)
                    checkpoints.save(done, state, record())
                bar.update(1)
                if stopped:
                    break
    finally:
        bar.close()
        checkpoints.wait()
        preemption.restore()
    return state, metrics, stopped


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


class _NonFiniteSteps:
    """The longest run of skipped (non-finite) steps, counted on the device; `check` reads
    it (a wait for the device) and stops the run once it reaches `limit`."""

    def __init__(self, limit: int, out):
        self._limit, self._out = limit, out
        self._counts = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))  # (run, longest)

    def add(self, skipped: jax.Array) -> None:
        self._counts = _count_skipped(*self._counts, skipped)

    def check(self, step: int) -> None:
        longest = int(self._counts[1])
        if longest >= self._limit:
            raise BertJaxError(f"{longest} non-finite losses in a row by step {step}; the last "
                               f"good checkpoint is kept in {self._out}")


@jax.jit
def _count_skipped(run, longest, skipped):
    run = jnp.where(skipped, run + 1, 0)
    return run, jnp.maximum(longest, run)


class Preemption:
    """SIGTERM (a TPU VM's preemption notice) turned into a step to stop at, the same on
    every process: one host may get the signal steps before another, and a checkpoint
    saved at different steps would hang the collective save.

    One process: a signal handler sets a flag the loop reads. Several: JAX's preemption
    sync point (`jax.distributed`'s coordination service, which catches the signal and
    agrees on the step with every process; as Orbax and MaxText use it), a host-side
    exchange that never waits for the devices."""

    def __init__(self):
        self._shared = jax.process_count() > 1
        self.requested = False
        if not self._shared:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer)."""
        if self._shared:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                step)
        return self.requested

    def restore(self):
        if not self._shared:
            signal.signal(signal.SIGTERM, self._previous)

