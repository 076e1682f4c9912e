"""Every attention backend against the reference, and its speed, on the current device.

    python -m benchmarks.attention_backends [--batch 8] [--seq 512] [--heads 16] [--head-dim 64]
                                            [--splash-interpret]

Random q/k/v with right padding (a quarter of each row but the first is padding), alone and
with causal / sliding-window masks; prints the max abs difference to the reference backend
over the real query rows, and ms per call (forward). "splash" runs on TPU, and elsewhere in
Pallas interpret mode (a correctness check, far from its TPU speed) with --splash-interpret.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import timed
from bert_jax.modeling.attention import AttentionMask, attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--splash-interpret", action="store_true",
                        help="off TPU, also run the splash kernel in interpret mode (slow)")
    args = parser.parse_args()

    b, t, n, h = args.batch, args.seq, args.heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    lengths = np.full(b, t)
    lengths[1:] = t - t // 4
    padding = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    masks = {"padding": AttentionMask(key_padding_BS=padding),
             "padding+causal": AttentionMask(key_padding_BS=padding, causal=True),
             "padding+window(64,64)": AttentionMask(key_padding_BS=padding, window=(64, 64))}
    backends = ["reference", "jax"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    if jax.default_backend() == "tpu" or args.splash_interpret:
        backends.append("splash")
    print(f"# attention B={b} T={t} N={n} H={h}, right padding, on {jax.devices()[0].device_kind}")
    print("| mask | dtype | backend | max abs diff vs reference | ms / call |")
    print("|---|---|---|---|---|")
    for (name, mask), dtype in itertools.product(masks.items(), (jnp.float32, jnp.bfloat16)):
        q, k, v = (jax.random.normal(key, (b, t, n, h), dtype) for key in keys)
        reference = None
        for backend in backends:
            fn = jax.jit(lambda q, k, v, backend=backend, mask=mask: attend(q, k, v, mask,
                                                                             backend=backend))
            try:
                out = np.asarray(fn(q, k, v).astype(jnp.float32))
            except Exception as err:  # a backend unsupported for this dtype/device
                print(f"| {name} | {jnp.dtype(dtype).name} | {backend} | unsupported: "
                      f"{type(err).__name__} | |")
                continue
            if reference is None:
                reference = out
            diff = np.abs(out - reference)[np.asarray(padding)].max()
            ms = timed(lambda: fn(q, k, v).block_until_ready(), 3, 20) * 1e3
            print(f"| {name} | {jnp.dtype(dtype).name} | {backend} | {diff:.2e} | {ms:.3f} |")


if __name__ == "__main__":
    main()
