"""Sliding-window attention on one long sequence: dense vs blockwise reference backend.

    python -m benchmarks.long_context_memory [--seq 16384] [--window 256] [--heads 10]
                                             [--head-dim 64] [--causal]

One attention call, B=1, fp32, window (w, w) (or causal (w, 0)). Prints the compiled temp
memory (XLA `memory_analysis()`, compile only) of the dense reference path ([B, N, T, T]
scores) and of the blockwise path `attend` takes for long windows, and the wall time of one
blockwise call. The dense path is never run (at 16k tokens it needs tens of GiB).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.timing import timed
from bert_jax.modeling import attention
from bert_jax.modeling.attention import AttentionMask, attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()

    t, n, h, w = args.seq, args.heads, args.head_dim, args.window
    mask = AttentionMask(causal=args.causal, window=(w, 0) if args.causal else (w, w))
    shape = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)

    def dense(q, k, v):
        return attention._reference(q, k, v, mask.to_dense(t, t), h ** -0.5, 0.0, None)

    def reference(q, k, v):
        return attend(q, k, v, mask, backend="reference")

    blockwise = attention._use_blockwise(t, t, mask)
    device = jax.devices()[0]
    print(f"# one attention call, B=1 T={t} N={n} H={h} fp32, window {mask.window}"
          f"{' causal' if args.causal else ''}, block {attention.BLOCK_SIZE}, on "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}")
    print("| path | compiled temp memory | ms / call |")
    print("|---|---|---|")
    rows = [("dense reference [B,N,T,T] (compile only)", dense, False),
            (f"reference via `attend` ({'blockwise' if blockwise else 'dense: rule off'})",
             reference, True)]
    for name, fn, run in rows:
        compiled = jax.jit(fn).lower(shape, shape, shape).compile()
        stats = compiled.memory_analysis()
        memory = f"{stats.temp_size_in_bytes / 2**20:,.1f} MiB" if stats else "n/a"
        ms = "not run"
        if run:
            q, k, v = (jax.random.normal(key, shape.shape, shape.dtype)
                       for key in jax.random.split(jax.random.key(0), 3))
            ms = f"{timed(lambda: compiled(q, k, v).block_until_ready(), 1, 3) * 1e3:,.1f}"
        print(f"| {name} | {memory} | {ms} |")


if __name__ == "__main__":
    main()
