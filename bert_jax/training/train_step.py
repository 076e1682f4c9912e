"""Train state, created already sharded, and the jitted train step.

`create_train_state` never materialises the model on one device: shapes come from
`jax.eval_shape`, shardings from the logical axis rules, and the init runs under `jax.jit`
with those `out_shardings`. `make_train_step` compiles the step with the same shardings and
donates the old state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

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
    boxed = family.abstract_variables(config)["params"]
    params = sharding.param_shardings(boxed, mesh)
    abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    opt_state = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt_state, params,
        transform_non_params=lambda _: sharding.replicated(mesh))
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=params, opt_state=opt_state, rng=rep)


def create_train_state(config, optimizer, mesh, seed: int = 0, params=None) -> TrainState:
    """A fresh (or, given `params`, a continued-pretraining) state, placed by `mesh`."""
    family = family_of_config(config)
    shardings = state_shardings(config, optimizer, mesh)

    def init(key):
        init_key, dropout_key = jax.random.split(key)
        p = params if params is not None else family.fresh_params(config, init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          rng=jax.random.key_data(dropout_key))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def step_key(state: TrainState) -> jax.Array:
    """This step's key, fold_in(rng, step): a resumed run draws the same randomness."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def model_loss(config) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """loss(params, batch, dropout_key): the model's own loss on `batch` (as transformers)."""
    module = family_of_config(config).build_module(config)

    def loss_fn(params, batch, dropout_key):
        out = module.apply({"params": params}, **batch, deterministic=False,
                           rngs={"dropout": dropout_key})
        return out.loss

    return loss_fn


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
                    schedule: Callable[[jax.Array], jax.Array] | None = None):
    """step(state, batch) -> (state, metrics). `batch` holds the model's keyword inputs
    (labels included) as [B, ...] arrays; the loss is the model's own (as transformers).
    Call it under `jax.set_mesh(mesh)`, which lets the model keep activations batch-split."""
    loss_fn = model_loss(config)

    def step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_key(state))
        return apply_gradients(state, optimizer, loss, grads, schedule)

    return jit_step(step, config, optimizer, mesh)


def make_eval_step(config, mesh):
    """eval(params, batch) -> summed loss / correct / counts (add over batches, then divide):
    masked-LM loss and accuracy over labelled tokens (`mlm_*`), NSP accuracy when the head has
    it, and for GPT-BERT's mixed batches the causal rows apart (`causal_*`)."""
    module = family_of_config(config).build_module(config)
    params_sharding = sharding.param_shardings(
        family_of_config(config).abstract_variables(config)["params"], mesh)

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
