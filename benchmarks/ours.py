"""The bert_jax side of a benchmark row: the library's own forward, bucketed inference and
train step, each returned as a zero-argument callable that blocks until its result is ready.

Nothing here re-implements the model path: the forward is `PretrainedModel.__call__`, the
variable-length set goes through `inference.batching.run_in_buckets` (the pipelines' length
buckets), and the train step is `training.train_step.make_train_step` with the recipes'
optimizer (`build_optimizer`), on a one-device mesh.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import sharding
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import PretrainedModel
from bert_jax.training.optimizer import OptimizerConfig, build_optimizer
from bert_jax.training.train_step import create_train_state, make_train_step

# AdamW as BERT was trained (lr is irrelevant to speed; constant so the step never changes).
OPTIMIZER = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1, schedule="constant")


def forward(model: PretrainedModel, inputs: dict[str, np.ndarray]):
    """() -> MLM logits of one batch, on the host-side inputs a user would pass."""
    return lambda: model(**inputs).logits.block_until_ready()


@jax.jit
def _top1(out, inputs):
    """What leaves the device per token in the variable-length workload (fill-mask style)."""
    del inputs
    return jnp.argmax(out.logits, -1)


def bucketed(model: PretrainedModel, rows: list[np.ndarray], batch_size: int):
    """() -> top-1 predictions of every row, batched as the inference pipelines batch
    (sorted by length, padded to power-of-two buckets)."""
    encodings = [types.SimpleNamespace(ids=ids, type_ids=np.zeros_like(ids)) for ids in rows]
    return lambda: run_in_buckets(model, encodings, _top1, batch_size=batch_size)


def train_step(config, params, batch: dict[str, np.ndarray]):
    """(step, xla_bytes): `step()` runs one MLM train step (dropout as configured) on `batch`
    and blocks on its loss; `xla_bytes` is the compiled step's planned memory (arguments +
    temporaries + outputs - donated), what the step needs on the device."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    optimizer = build_optimizer(OPTIMIZER)
    with jax.set_mesh(mesh):
        state = create_train_state(config, optimizer, mesh, params=params)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh, 1))
        compiled = make_train_step(config, optimizer, mesh).lower(state, batch).compile()
    holder = {"state": state}

    def step():
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
        return float(metrics["loss"])

    return step, xla_bytes(compiled)


def forward_xla_bytes(model: PretrainedModel, inputs: dict[str, np.ndarray]) -> int | None:
    """The planned device memory of the forward that `PretrainedModel` jits (compiled again)."""
    fn = jax.jit(lambda params, x: model.module.apply({"params": params}, **x).logits)
    return xla_bytes(fn.lower(model.params, inputs).compile())


def xla_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)
