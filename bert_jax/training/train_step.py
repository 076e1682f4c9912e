"""Train state, created already sharded, and the jitted train step.

`create_train_state` never materialises the model on one device: shapes come from
`jax.eval_shape`, shardings from the logical axis rules, and the init runs under `jax.jit`
with those `out_shardings`; loaded params enter it as an argument, already placed, never as
constants of the program. `make_train_step` compiles the step with the same shardings and
donates the old state; with `accumulation_steps` it scans over micro-batches inside that one
program, so the update is the large batch's.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from bert_jax import sharding
from bert_jax.convert.families import family_of_config
from bert_jax.modeling.heads import labels_at


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 data of the dropout key; step s uses fold_in(key, s)


def state_shardings(config, optimizer: optax.GradientTransformation, mesh):
    """Shardings of every TrainState leaf: optimizer moments follow their params."""
    family = family_of_config(config)
    params = family.param_shardings(config, mesh)
    abstract_opt_state = jax.eval_shape(
        optimizer.init, nn.meta.unbox(family.abstract_variables(config)["params"]))
    opt_state = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt_state, params,
        transform_non_params=lambda _: sharding.replicated(mesh))
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=params, opt_state=opt_state, rng=rep)


def create_train_state(config, optimizer, mesh, seed: int = 0, params=None) -> TrainState:
    """A fresh (or, given `params`, a continued-pretraining) state, placed by `mesh`.
    `params` should already be placed (`pretrained.from_pretrained(..., mesh=mesh)`)."""
    return state_initializer(config, optimizer, mesh, fresh=params is None)(
        jax.random.key(seed), params)


def state_initializer(config, optimizer, mesh, *, fresh: bool):
    """init(key, params) -> TrainState, jitted into `mesh`'s shardings: params drawn from
    `key` when `fresh` (then `params` is None), else `params` taken as they are."""
    family = family_of_config(config)
    shardings = state_shardings(config, optimizer, mesh)

    def init(key, params):
        init_key, dropout_key = jax.random.split(key)
        if fresh:
            params = family.fresh_params(config, init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.key_data(dropout_key))

    return jax.jit(init, in_shardings=(sharding.replicated(mesh),
                                       None if fresh else shardings.params),
                   out_shardings=shardings)


def step_key(state: TrainState) -> jax.Array:
    """This step's key, fold_in(rng, step): a resumed run draws the same randomness."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def model_loss(config) -> Callable[..., jax.Array]:
    """loss(params, batch, dropout_key, **kw): the model's own loss on `batch` (as
    transformers); `kw` goes to the model (e.g. `loss_counts`)."""
    module = family_of_config(config).build_module(config)

    def loss_fn(params, batch, dropout_key, **kw):
        out = module.apply({"params": params}, **batch, **kw, deterministic=False,
                           rngs={"dropout": dropout_key})
        return out.loss

    return loss_fn


def accumulated_loss_and_grads(config, steps: int, mesh):
    """f(params, batch, key) -> (loss, grads) of the whole batch, computed `steps`
    micro-batches at a time in a `lax.scan` (one program, one micro-batch of activations).

    The result is the large batch's: models that normalise their loss by labelled tokens
    (masked LM, NSP, GPT-BERT's hybrid objective: those taking `loss_counts`) divide every
    micro-batch's sum by the whole batch's counts, so a micro-batch with more masked tokens
    weighs more, exactly as in one large batch; the other heads' losses (one per example)
    are averaged. Micro-batch j holds rows j, j + steps, ...: each device keeps its own rows.
    """
    module = family_of_config(config).build_module(config)
    loss_fn = model_loss(config)
    by_count = "loss_counts" in inspect.signature(module.__call__).parameters
    value_and_grad = jax.value_and_grad(loss_fn)
    if steps == 1:
        return value_and_grad

    def micro_batches(x):
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES)))

    def f(params, batch, key):
        counts = (module.apply({"params": params}, **batch).loss_counts if by_count else None)
        kw = {} if counts is None else {"loss_counts": counts}  # a forward XLA drops: counts
        # depend on the labels alone

        def add(total, micro):
            index, micro_batch = micro
            loss, grads = value_and_grad(params, micro_batch, jax.random.fold_in(key, index), **kw)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add, zeros, (jnp.arange(steps),
                                                     jax.tree.map(micro_batches, batch)))
        if counts is None:
            loss, grads = jax.tree.map(lambda x: x / steps, (loss, grads))
        return loss, grads

    return f


def apply_gradients(state: TrainState, optimizer, loss, grads,
                    schedule: Callable[[jax.Array], jax.Array] | None = None):
    """One optimizer update -> (state, metrics). A non-finite loss or gradient skips the
    update (the batch still counts as consumed). The skip is a `lax.cond`, not a select of
    new against old state: on the CPU that select and its copies cost ~10% of a BERT-base
    train step."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params,
                                     state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite}
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_step(step, config, optimizer, mesh):
    """`step(state, batch)` jitted with the state's shardings, the batch split over
    data x fsdp (every leaf, other dims whole), and the old state donated."""
    shardings = state_shardings(config, optimizer, mesh)
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, ndim=1)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_train_step(config, optimizer, mesh,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    accumulation_steps: int = 1):
    """step(state, batch) -> (state, metrics): one optimizer update on the whole batch.
    `batch` holds the model's keyword inputs (labels included) as [B, ...] arrays; the loss
    is the model's own (as transformers), over `accumulation_steps` micro-batches of
    B / accumulation_steps rows (`accumulated_loss_and_grads`). Call it under
    `jax.set_mesh(mesh)`, which lets the model keep activations batch-split."""
    loss_and_grads = accumulated_loss_and_grads(config, accumulation_steps, mesh)

    def step(state: TrainState, batch):
        loss, grads = loss_and_grads(state.params, batch, step_key(state))
        return apply_gradients(state, optimizer, loss, grads, schedule)

    return jit_step(step, config, optimizer, mesh)


def make_eval_step(config, mesh):
    """eval(params, batch) -> summed loss / correct / counts (add over batches, then divide):
    masked-LM loss and accuracy over labelled tokens (`mlm_*`), NSP accuracy when the head has
    it, and for GPT-BERT's mixed batches the causal rows apart (`causal_*`)."""
    family = family_of_config(config)
    module = family.build_module(config)
    params_sharding = family.param_shardings(config, mesh)

    def evaluate(params, batch):
        out = module.apply({"params": params}, **batch)
        logits = getattr(out, "prediction_logits", None)
        logits = out.logits if logits is None else logits
        labels = batch["labels"]
        if "masked_positions" in batch:  # the logits are at those positions only
            labels = labels_at(labels, batch["masked_positions"])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        token_loss = -jnp.take_along_axis(log_probs, jnp.where(labels < 0, 0, labels)[..., None],
                                          -1)[..., 0]
        correct = jnp.argmax(logits, -1) == labels

        def sums(name, rows_B):
            valid = (labels != -100) & rows_B[:, None]
            return {f"{name}_loss_sum": jnp.sum(jnp.where(valid, token_loss, 0.0)),
                    f"{name}_correct": jnp.sum(valid & correct), f"{name}_tokens": jnp.sum(valid)}

        causal_rows = batch.get("causal_rows")
        if causal_rows is None:
            result = sums("mlm", jnp.ones(labels.shape[:1], bool))
        else:
            result = sums("mlm", ~causal_rows) | sums("causal", causal_rows)
        if "next_sentence_label" in batch:
            nsp = jnp.argmax(out.seq_relationship_logits, -1) == batch["next_sentence_label"]
            result |= {"nsp_correct": jnp.sum(nsp), "nsp_examples": nsp.size}
        return result

    return jax.jit(evaluate, in_shardings=(params_sharding, sharding.batch_sharding(mesh, 1)),
                   out_shardings=sharding.replicated(mesh))
