"""Per-device memory of BERT pretraining on a 16-device mesh, without the devices.

    python -m benchmarks.sharded_memory [--model bert-large-cased] [--devices 16]
        [--mesh 1,16,1] [--batch 256] [--seq 512] [--remat none|full|dots] [--dtype bfloat16]
        [--topology v5e:4x4]

Builds the sharded train state abstractly (`jax.eval_shape`, nothing allocated) and compiles
one train step (MLM + NSP, AdamW) for the devices, without having them: simulated CPU devices
(`--xla_force_host_platform_device_count`), or with `--topology` a Cloud TPU slice compiled
ahead of time by the real TPU compiler (needs the `libtpu` wheel, e.g.
`pip install libtpu==0.0.42.1` in a separate venv; no TPU needed). Prints (b) the bytes of
params + optimizer state each device holds against the ideal total / devices, and (c) the
compiler's per-device memory of the step. Only a TPU (or GPU) compile shows what a remat
policy saves: the CPU compiler's buffer assignment keeps about the same peak with or without it.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-large-cased")
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--mesh", default="1,16,1", help="data,fsdp,tensor")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--topology", default=None,
                        help="compile for this Cloud TPU slice instead, e.g. v5e:4x4 (16 chips)")
    args = parser.parse_args()
    if "jax" in sys.modules:
        raise SystemExit("run as a fresh process: the device count is fixed when JAX starts")
    if args.topology is None:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata here

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from bert_jax import sharding
    from bert_jax.convert.families import BERT
    from bert_jax.modeling.presets import preset
    from bert_jax.training.train_step import TrainState, make_train_step, state_shardings

    config = preset(args.model, dtype=args.dtype, remat=args.remat,
                    architectures=(preset(args.model).class_prefix + "ForPreTraining",))
    devices = None
    if args.topology is not None:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu",
                                               topology_name=args.topology).devices
    mesh = sharding.make_mesh(sharding.MeshConfig(*map(int, args.mesh.split(","))), devices)
    where = (f"{len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind} ({args.topology}, "
             f"compiled ahead of time)" if devices else f"{args.devices} simulated CPU devices")
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    shardings = state_shardings(config, optimizer, mesh)

    params = nn.meta.unbox(BERT.abstract_variables(config)["params"])
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(optimizer.init, params),
                          rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    per_device = sharding.bytes_per_device(abstract)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))

    batch = {"input_ids": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
             "token_type_ids": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
             "labels": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
             "next_sentence_label": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
    step = make_train_step(config, optimizer, mesh)
    with jax.set_mesh(mesh):
        stats = step.lower(abstract, batch).compile().memory_analysis()
    gib = 2**30
    print(f"# {config.architecture} ({args.model}), mesh data,fsdp,tensor = {args.mesh} on "
          f"{where}, batch {args.batch} x seq {args.seq}, "
          f"{args.dtype} compute, fp32 params + AdamW, remat={args.remat}, jax {jax.__version__}")
    print("| quantity | per device | note |")
    print("|---|---|---|")
    print(f"| params + optimizer state | {per_device / gib:.3f} GiB | "
          f"{per_device * args.devices / total:.3f} x ideal (total {total / gib:.2f} GiB / "
          f"{args.devices}) |")
    peak = stats.argument_size_in_bytes + stats.temp_size_in_bytes
    print(f"| compiled step: arguments + temporaries | {peak / gib:.2f} GiB | arguments "
          f"{stats.argument_size_in_bytes / gib:.2f}, temporaries "
          f"{stats.temp_size_in_bytes / gib:.2f} (state donated) |")


if __name__ == "__main__":
    main()
