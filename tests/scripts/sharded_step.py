"""Two train steps of a tiny BertForPreTraining on a given mesh; saves loss and params.

    XLA_FLAGS=--xla_force_host_platform_device_count=16 python sharded_step.py OUT.npz D F T [CKPT]

With CKPT, the final train state is also saved there as a training checkpoint (step 2).

Run in its own process because the simulated device count is fixed at JAX start-up.
"""

import sys

import jax
import numpy as np
import optax
from flax import traverse_util

import bert_jax
from bert_jax import sharding
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.train_step import create_train_state, make_train_step

# Every split dimension divides its mesh axes (the tiny preset's MLP width, 37, would not divide
# tensor=2): the params are really split, none replicated.
CONFIG = bert_jax.preset("tiny", architectures=("BertForPreTraining",), vocab_size=128,
                         intermediate_size=48)
OPTIMIZER = optax.adamw(1e-3, weight_decay=0.01)


def main(out, data, fsdp, tensor, checkpoint_dir=None):
    mesh = sharding.make_mesh(sharding.MeshConfig(int(data), int(fsdp), int(tensor)))
    config, optimizer = CONFIG, OPTIMIZER
    state = create_train_state(config, optimizer, mesh, seed=0)
    step = make_train_step(config, optimizer, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        ids = rng.integers(5, 128, (16, 24)).astype(np.int32)
        labels = np.where(rng.random(ids.shape) < 0.15, ids, -100).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": (np.arange(24) >= 12).astype(np.int32)[None].repeat(16, 0),
                 "labels": labels, "next_sentence_label": rng.integers(0, 2, 16).astype(np.int32)}
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    if checkpoint_dir is not None:
        checkpoints = TrainCheckpoints(checkpoint_dir, async_save=False)
        checkpoints.save(2, state, {"mesh": [int(data), int(fsdp), int(tensor)]})
        checkpoints.wait()
        checkpoints.close()
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    np.savez(out, losses=np.array(losses), devices=len(jax.devices()),
             per_device_bytes=sharding.bytes_per_device(state.params), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
