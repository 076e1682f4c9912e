"""Peak memory of a whole GPT-BERT forward on one long sequence (compile only).

    python -m benchmarks.long_context_model [--model norbert4-base] [--seq 16384]
                                            [--dtype float32|bfloat16] [--causal]

XLA's `memory_analysis()` of the jitted encoder forward, B=1, from abstract params (nothing
is allocated, so it runs on a small machine): parameters, and temporaries at their peak.
Local layers take the blockwise sliding-window path; global layers (window 8192) are
dense at this length.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.convert.families import GPT_BERT
from bert_jax.modeling.presets import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="norbert4-base")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()

    head = "GptBertForCausalLM" if args.causal else "GptBertModel"
    config = preset(args.model, dtype=args.dtype, architectures=(head,))
    config = dataclasses.replace(config, max_sequence_length=max(args.seq,
                                                                 config.max_sequence_length))
    module = GPT_BERT.build_module(config)
    params = nn.meta.unbox(GPT_BERT.abstract_variables(config)["params"])
    ids = jax.ShapeDtypeStruct((1, args.seq), jnp.int32)

    def forward(params, ids):
        out = module.apply({"params": params}, ids)
        return out.last_hidden_state if hasattr(out, "pooler_output") else out.logits

    stats = jax.jit(forward).lower(params, ids).compile().memory_analysis()
    gib = 2**30
    print(f"# {args.model} {'causal' if args.causal else 'bidirectional'} forward, B=1, "
          f"T={args.seq}, {args.dtype}, on {jax.devices()[0].platform}, jax {jax.__version__}")
    print("| parameters | temporaries (peak) | outputs |")
    print("|---|---|---|")
    print(f"| {stats.argument_size_in_bytes / gib:.2f} GiB "
          f"| {stats.temp_size_in_bytes / gib:.2f} GiB "
          f"| {stats.output_size_in_bytes / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
