"""MLM inference forward: bert_jax vs Hugging Face PyTorch on the same inputs, in one run.

    python -m benchmarks.forward [--model bert-base-cased] [--batch 8] [--seq 128]
                                 [--dtype float32|bfloat16] [--backend reference|jax|cudnn]

Random weights of the preset's shape (nothing is downloaded); prints a table of tokens/s and
the ratio bert_jax / PyTorch. PyTorch runs on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import jax
import numpy as np


def timed(fn, warmup: int, iters: int) -> float:
    """Median seconds per call of `fn` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_bert_jax(config, ids, mask, warmup, iters):
    from bert_jax.families import BERT
    from bert_jax.pretrained import PretrainedModel

    model = PretrainedModel(config, BERT.init_params(config))
    return timed(lambda: model(ids, attention_mask=mask).logits.block_until_ready(), warmup, iters)


def bench_torch(config, ids, mask, warmup, iters):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = getattr(transformers, f"{config.class_prefix}Config")(
        **{k: v for k, v in config.to_hf_dict().items() if k != "architectures"},
        attn_implementation="sdpa")
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    model = getattr(transformers, config.architecture)(hf_config).to(device, dtype).eval()
    ids_t, mask_t = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)

    def step():
        with torch.inference_mode():
            model(input_ids=ids_t, attention_mask=mask_t).logits.float().sum().item()

    return timed(step, warmup, iters), f"torch {torch.__version__} ({device}, sdpa)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-cased")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--backend", default="reference", choices=("reference", "jax", "cudnn"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    from bert_jax.modeling.presets import preset

    config = preset(args.model, dtype=args.dtype, attention_backend=args.backend)
    config = dataclasses.replace(config, architectures=(config.class_prefix + "ForMaskedLM",))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = ids.size

    ours = bench_bert_jax(config, ids, mask, args.warmup, args.iters)
    theirs, torch_desc = bench_torch(config, ids, mask, args.warmup, args.iters)
    device = jax.devices()[0].device_kind
    print(f"# {args.model} MLM forward, batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"jax {jax.__version__} on {device} ({platform.processor() or platform.machine()})")
    print("| implementation | ms / batch | tokens/s |")
    print("|---|---|---|")
    print(f"| bert_jax ({args.backend}) | {ours * 1e3:.1f} | {tokens / ours:,.0f} |")
    print(f"| {torch_desc} | {theirs * 1e3:.1f} | {tokens / theirs:,.0f} |")
    print(f"\nratio bert_jax / PyTorch: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
