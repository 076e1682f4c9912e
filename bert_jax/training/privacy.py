"""DP-SGD: per-example clipping, Gaussian noise, sampling and the (epsilon, delta) accountant.

The step is Opacus' algorithm (the bar for the Danish `ts1` model): each example's gradient
(of its own loss) is clipped to L2 norm `clip_norm`, the clipped gradients are summed,
N(0, (noise_multiplier * clip_norm)^2) noise is added to the sum, and the result is divided
by the *expected* batch size. The accountant is `dp_accounting`'s (RDP, as Opacus' default, or
PLD).

Poisson sampling gives batches of varying size; the step takes a fixed number of rows and a
`batch["example_mask"]` (False on padding rows), so padding contributes nothing and nothing
recompiles. `DpPlan.sample` draws each step's indices on the host, deterministically from
(seed, step), so a resumed run draws the same batches.

optax's `contrib.differentially_private_aggregate` is not used: it needs every per-example
gradient in memory at once (no chunks), divides by the rows present (not the expected batch
size, no mask), and keeps its noise key in the optimizer state. Its pieces are:
`optax.tree.norm` per example and `optax.tree.random_like` for the noise.

The loss, norms and counts in the metrics are computed from the private batch without noise:
logging them is outside the (epsilon, delta) guarantee, as in Opacus.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting import pld, rdp
from scipy import stats

from bert_jax.errors import BertJaxError
from bert_jax.training.train_step import (
    TrainState,
    apply_gradients,
    jit_step,
    model_loss,
    step_key,
)

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
# Chance that a Poisson sample outgrows the fixed rows of a step at least once in a whole run.
OVERFLOW_PROBABILITY = 1e-9

_REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpConfig:
    """The privacy settings of a run (a recipe's `dp:` section).

    Give `noise_multiplier`, or `target_epsilon` to have the noise picked for the run's
    sampling rate and steps. `sampling`: "poisson" (each example joins a step with
    probability batch_size / dataset_size; add/remove-one neighbours, as Opacus) or "fixed"
    (exactly batch_size examples drawn without replacement; replace-one neighbours, RDP
    only). `chunk_size`: examples whose per-example gradients are held at once (across the
    whole mesh; a multiple of data x fsdp keeps every device busy), None for all rows; with
    Poisson sampling it also lets the step skip the spare rows, chunk by chunk.
    """

    clip_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    sampling: str = "poisson"
    accountant: str = "rdp"
    chunk_size: int | None = None

    def __post_init__(self):
        def bad(field: str, why: str):
            raise BertJaxError(f"dp config: {field}={getattr(self, field)!r} {why}")

        def positive(field: str, allow_zero: bool = False):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
                bad(field, f"must be a finite number {'>=' if allow_zero else '>'} 0")

        positive("clip_norm")
        positive("delta")
        if self.delta >= 1:
            bad("delta", "must be < 1")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise BertJaxError("dp config: give exactly one of noise_multiplier and "
                               "target_epsilon")
        if self.noise_multiplier is not None:
            positive("noise_multiplier", allow_zero=True)
        if self.target_epsilon is not None:
            positive("target_epsilon")
        if self.sampling not in SAMPLINGS:
            bad("sampling", f"is not one of {', '.join(SAMPLINGS)}")
        if self.accountant not in ACCOUNTANTS:
            bad("accountant", f"is not one of {', '.join(ACCOUNTANTS)}")
        if self.sampling == "fixed" and self.accountant != "rdp":
            bad("accountant", "cannot account fixed-size sampling; use rdp")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not
                                            isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            bad("chunk_size", "must be an integer >= 1 (or None)")

    def plan(self, dataset_size: int, batch_size: int, steps: int,
             multiple_of: int = 1) -> DpPlan:
        """This config applied to a run of `steps` steps drawing `batch_size` examples per
        step (the expected number under Poisson sampling) from `dataset_size`.

        The rows of every step are a multiple of `multiple_of` (the data x fsdp mesh size)
        and of `chunk_size`: batch_size itself for fixed sampling, else the smallest count that
        a Poisson sample exceeds in a whole run with probability below OVERFLOW_PROBABILITY.
        """
        if not 1 <= batch_size <= dataset_size:
            raise BertJaxError(f"dp: batch size {batch_size} must be in [1, dataset size "
                               f"{dataset_size}]")
        if steps < 1:
            raise BertJaxError(f"dp: steps={steps} must be >= 1")
        unit = math.lcm(multiple_of, self.chunk_size or 1)
        if self.sampling == "fixed":
            rows = batch_size
            if rows % unit:
                raise BertJaxError(f"dp: fixed batch size {batch_size} is not a multiple of "
                                   f"{unit} (data x fsdp and chunk_size)")
        else:
            largest = stats.binom.isf(OVERFLOW_PROBABILITY / steps, dataset_size,
                                      batch_size / dataset_size)
            rows = unit * math.ceil(max(largest, 1) / unit)
        return DpPlan(config=self, dataset_size=dataset_size, batch_size=batch_size,
                      steps=steps, rows=rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpPlan:
    """What the private step, the sampler and the accountant need, for one run."""

    config: DpConfig
    dataset_size: int
    batch_size: int  # examples per step: expected (Poisson) or exact (fixed)
    steps: int
    rows: int  # rows of every step's batch, padding included

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @functools.cached_property
    def noise_multiplier(self) -> float:
        """The config's, or the smallest (to 1e-6) that meets its target epsilon."""
        if self.config.noise_multiplier is not None:
            return float(self.config.noise_multiplier)
        return self._accounting.noise_multiplier_for(self.config.target_epsilon, self.steps)

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon at the config's delta after `steps` steps (default: the whole run)."""
        steps = self.steps if steps is None else steps
        return self._accounting.epsilon(self.noise_multiplier, steps)

    def guarantee(self, steps: int) -> dict:
        """What a run logs with its metrics after `steps` steps: the guarantee so far, at the
        config's delta."""
        return {"epsilon": self.epsilon(steps), "noise_multiplier": self.noise_multiplier}

    def sample(self, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices_R, mask_R): the examples of `step`, padded to `rows` with index 0 and
        mask False. The same (seed, step) always gives the same sample.

        Examples fill the step's chunks one after the other (chunk g is rows g, g + groups,
        ..., see `make_dp_train_step`), so chunks of padding only are skipped.
        """
        rng = np.random.default_rng([seed, step])
        count = (self.batch_size if self.config.sampling == "fixed"
                 else rng.binomial(self.dataset_size, self.sample_rate))
        if count > self.rows:
            raise BertJaxError(f"dp: step {step} sampled {count} examples, more than the "
                               f"{self.rows} rows of a batch (probability below "
                               f"{OVERFLOW_PROBABILITY:g} per run)")
        chunk_size = self.config.chunk_size or self.rows
        filled = np.arange(self.rows).reshape(chunk_size, -1).T.ravel()[:count]
        indices, mask = np.zeros(self.rows, np.int64), np.zeros(self.rows, bool)
        indices[filled] = rng.choice(self.dataset_size, count, replace=False)
        mask[filled] = True
        return indices, mask

    @property
    def _accounting(self) -> _Accounting:
        if self.config.sampling == "poisson":
            return _poisson_accounting(self.sample_rate, self.config.delta,
                                       self.config.accountant)

        # Replacing one example moves the clipped sum by up to 2 * clip_norm: the noise is
        # noise_multiplier / 2 times that sensitivity.
        def fixed_size(noise_multiplier: float) -> dp_accounting.DpEvent:
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.dataset_size, self.batch_size,
                dp_accounting.GaussianDpEvent(noise_multiplier / 2))

        return _Accounting(lambda: rdp.RdpAccountant(neighboring_relation=_REPLACE_ONE),
                           fixed_size, self.config.delta)


@dataclasses.dataclass(frozen=True)
class _Accounting:
    """Epsilon of a DP-SGD run and its inverse, for one sampling scheme: `step_event` is one
    step's DpEvent at a noise multiplier, `new_accountant` makes a fresh accountant."""

    new_accountant: Callable[[], Any]
    step_event: Callable[[float], dp_accounting.DpEvent]
    delta: float

    def _event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
        if noise_multiplier == 0:  # no privacy (and dp_accounting's sampled RDP divides by it)
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.SelfComposedDpEvent(self.step_event(noise_multiplier), steps)

    def epsilon(self, noise_multiplier: float, steps: int) -> float:
        return self.new_accountant().compose(
            self._event(noise_multiplier, steps)).get_epsilon(self.delta)

    def noise_multiplier_for(self, target_epsilon: float, steps: int) -> float:
        """The smallest noise multiplier (to 1e-6) whose epsilon is at most the target."""
        return float(dp_accounting.calibrate_dp_mechanism(
            self.new_accountant, lambda sigma: self._event(sigma, steps), target_epsilon,
            self.delta))


def _poisson_accounting(sample_rate: float, delta: float, accountant: str) -> _Accounting:
    return _Accounting(lambda: _new_accountant(accountant),
                       lambda sigma: dp_accounting.PoissonSampledDpEvent(
                           sample_rate, dp_accounting.GaussianDpEvent(sigma)), delta)


def _new_accountant(accountant: str):
    """A fresh accountant for add/remove-one neighbours (Opacus')."""
    if accountant not in ACCOUNTANTS:
        raise BertJaxError(f"accountant {accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    return rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon at `delta` of `steps` DP-SGD steps with Poisson sampling at `sample_rate`."""
    return _poisson_accounting(sample_rate, delta, accountant).epsilon(noise_multiplier, steps)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to 1e-6) whose `epsilon` is at most `target_epsilon`."""
    return _poisson_accounting(sample_rate, delta, accountant).noise_multiplier_for(
        target_epsilon, steps)


def clipped_gradients(loss_fn: Callable[[Any, dict, jax.Array], jax.Array], params,
                      batch_B: dict, keys_B: jax.Array, keep_B: jax.Array, clip_norm: float):
    """Each example's gradient of its own loss (vmap over batches of one), scaled to L2 norm
    at most `clip_norm`.

    Returns (losses_B, grads_B, norms_B before clipping, kept_B). Rows not in `keep_B`, and
    rows whose loss or gradient is not finite (e.g. no labelled token), get a zero gradient
    and kept False: one bad example costs its own contribution, never the step (skipping it
    would tell that the example was sampled).
    """
    def one(example, key):
        return jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda x: x[None], example), key)

    losses_B, grads_B = jax.vmap(one)(batch_B, keys_B)
    norms_B = jax.vmap(optax.tree.norm)(grads_B)
    kept_B = keep_B & jnp.isfinite(losses_B) & jnp.isfinite(norms_B)
    scale_B = jnp.where(kept_B, jnp.minimum(1.0, clip_norm / norms_B), 0.0)

    def clip(g):
        shape = (-1,) + (1,) * (g.ndim - 1)
        return jnp.where(kept_B.reshape(shape), scale_B.reshape(shape) * g, 0.0).astype(g.dtype)

    return losses_B, jax.tree.map(clip, grads_B), norms_B, kept_B


def make_dp_train_step(config, optimizer, mesh, plan: DpPlan,
                       schedule: Callable[[jax.Array], jax.Array] | None = None):
    """step(state, batch) -> (state, metrics), a DP-SGD `make_train_step`.

    `batch` holds `plan.rows` rows of the model's inputs (labels included) and optionally
    `example_mask` [R] (False on padding; absent means every row is an example). Metrics:
    loss (mean over the examples), grad_norm (of the noised gradient), skipped,
    learning_rate (with `schedule`), and per_example_grad_norm (mean, before clipping),
    clipped_fraction, examples, nonfinite_examples. `chunk_size` bounds memory, as
    `accumulation_steps` does for the plain step (which DP-SGD runs refuse).
    """
    loss_fn = model_loss(config)
    dp = plan.config
    chunk_size = dp.chunk_size or plan.rows
    if plan.rows % chunk_size:
        raise BertJaxError(f"dp: chunk_size {chunk_size} does not divide the {plan.rows} rows")
    groups = plan.rows // chunk_size

    def step(state: TrainState, batch):
        if any(x.shape[0] != plan.rows for x in jax.tree.leaves(batch)):
            raise BertJaxError(f"dp: every batch input needs the plan's {plan.rows} rows")
        batch = dict(batch)
        keep_R = batch.pop("example_mask", None)
        keep_R = jnp.ones(plan.rows, bool) if keep_R is None else keep_R.astype(bool)
        dropout_key, noise_key = jax.random.split(step_key(state))

        def add_chunk(sums, chunk):  # -> sums plus the chunk's
            batch_C, row_C, keep_C = chunk
            keys_C = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(dropout_key, row_C)
            losses_C, grads_C, norms_C, kept_C = clipped_gradients(
                loss_fn, state.params, batch_C, keys_C, keep_C, dp.clip_norm)
            terms = {"grads": jax.tree.map(lambda g: jnp.sum(g, axis=0), grads_C),
                     "loss": jnp.sum(jnp.where(kept_C, losses_C, 0.0)),
                     "per_example_grad_norm": jnp.sum(jnp.where(kept_C, norms_C, 0.0)),
                     "clipped": jnp.sum(kept_C & (norms_C > dp.clip_norm)),
                     "examples": jnp.sum(keep_C), "kept": jnp.sum(kept_C)}
            return jax.tree.map(jnp.add, sums, terms)

        def add_unless_padding(sums, chunk):
            return jax.lax.cond(jnp.any(chunk[2]), add_chunk, lambda s, _: s, sums, chunk), None

        # Chunk g holds rows g, g + groups, ...: with rows split over devices, every device
        # works on its share of every chunk. Chunks of padding only cost nothing.
        chunks = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(chunk_size, groups, *x.shape[1:]), 0, 1),
            (batch, jnp.arange(plan.rows), keep_R))
        real, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        sums, _ = jax.lax.scan(add_unless_padding, {
            "grads": jax.tree.map(jnp.zeros_like, state.params), "loss": real,
            "per_example_grad_norm": real, "clipped": count, "examples": count, "kept": count},
            chunks)
        std = plan.noise_multiplier * dp.clip_norm
        grads = jax.tree.map(lambda g, z: (g + std * z) / plan.batch_size, sums["grads"],
                             optax.tree.random_like(noise_key, sums["grads"]))
        kept = jnp.maximum(sums["kept"], 1)
        state, metrics = apply_gradients(state, optimizer, sums["loss"] / kept, grads, schedule)
        return state, metrics | {
            "per_example_grad_norm": sums["per_example_grad_norm"] / kept,
            "clipped_fraction": sums["clipped"] / kept, "examples": sums["examples"],
            "nonfinite_examples": sums["examples"] - sums["kept"]}

    return jit_step(step, config, optimizer, mesh)
