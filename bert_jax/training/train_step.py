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
from bert_jax.families import family_of_config


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
        p = params if params is not None else nn.meta.unbox(family.build_module(config).init(
            init_key, **family.example_inputs(config))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          rng=jax.random.key_data(dropout_key))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def make_train_step(config, optimizer, mesh,
                    schedule: Callable[[jax.Array], jax.Array] | None = None):
    """step(state, batch) -> (state, metrics). `batch` holds the model's keyword inputs
    (labels included) as [B, ...] arrays; the loss is the model's own (as transformers).
    Call it under `jax.set_mesh(mesh)`, which lets the model keep activations batch-split."""
    module = family_of_config(config).build_module(config)
    shardings = state_shardings(config, optimizer, mesh)

    def loss_fn(params, batch, dropout_key):
        out = module.apply({"params": params}, **batch, deterministic=False,
                           rngs={"dropout": dropout_key})
        return out.loss

    def step(state: TrainState, batch):
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    # One spec for every batch leaf: examples split over data x fsdp, other dims whole.
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, ndim=1)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
