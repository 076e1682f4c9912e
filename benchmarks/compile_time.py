"""Compile time and compiled memory of a pretraining train step: scanned vs unrolled layers,
for each remat policy.

    python -m benchmarks.compile_time [--model bert-large-cased] [--batch 8] [--seq 512]
        [--dtype float32] [--remat none,full,dots]

Each variant's jitted train step (one device, AdamW; BERT: MLM + NSP, GPT-BERT presets such as
norbert4-base: its hybrid masked/causal objective on packed rows) is lowered and compiled ahead
of time on abstract inputs (nothing allocated); prints a markdown table of the seconds spent
tracing + lowering and compiling, and the compiler's `memory_analysis()` temporaries. Timings
are wall clock of whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bert_jax import sharding
from bert_jax.convert.families import family_of_config
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.modeling.presets import preset
from bert_jax.training.train_step import TrainState, make_train_step, state_shardings


def pretraining_inputs(config, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch of the family's pretraining pipeline."""
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    if isinstance(config, GptBertConfig):
        return {"input_ids": tokens, "attention_mask": tokens, "position_ids": tokens,
                "segment_ids": tokens, "labels": tokens,
                "causal_rows": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
    return {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
            "labels": tokens, "next_sentence_label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def measure(model: str, scan_layers: bool, remat: str, batch: int, seq: int, dtype: str):
    """(lower seconds, compile seconds, temporaries bytes) of one variant's train step."""
    config = preset(model, dtype=dtype, remat=remat, scan_layers=scan_layers,
                    architectures=(preset(model).class_prefix + "ForPreTraining",))
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    params = nn.meta.unbox(family_of_config(config).abstract_variables(config)["params"])
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(optimizer.init, params),
                       rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, state_shardings(config, optimizer, mesh))
    inputs = pretraining_inputs(config, batch, seq)
    step = make_train_step(config, optimizer, mesh)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered = step.lower(state, inputs)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    return (lowered_at - start, compiled_at - lowered_at,
            compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-large-cased")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none,full,dots", help="comma-separated policies")
    args = parser.parse_args()
    print(f"# {args.model} pretraining train step (AdamW), batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}, 1 x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| layers | remat | trace + lower (s) | compile (s) | total (s) | temporaries (GiB) |")
    print("|---|---|---|---|---|---|")
    for scan_layers in (False, True):
        for remat in args.remat.split(","):
            lower_s, compile_s, temp = measure(args.model, scan_layers, remat, args.batch,
                                               args.seq, args.dtype)
            print(f"| {'scanned' if scan_layers else 'unrolled'} | {remat} | {lower_s:.1f} | "
                  f"{compile_s:.1f} | {lower_s + compile_s:.1f} | {temp / 2**30:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
