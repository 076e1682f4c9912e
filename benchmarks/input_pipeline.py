"""Host input pipeline throughput: NSP instances + dynamic masking, one process, NumPy only.

    python -m benchmarks.input_pipeline [--seq 512] [--seconds 5] [--docs-per-call 32]

A synthetic corpus of documents of random token-id sentences (5..40 tokens, 20..200
sentences per document; nothing is downloaded). Each step turns `--docs-per-call` documents
into [CLS] A [SEP] B [SEP] instances and masks them as one batch, as a loader worker would.
Prints sequences/s per stage as a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import numpy as np

from bert_jax.data.masking import mask_tokens, span_mask
from bert_jax.data.nsp import nsp_instances

VOCAB, PAD, CLS, SEP, MASK = 30_000, 0, 101, 102, 103


def synthetic_corpus(rng, n_docs: int):
    return [[rng.integers(1000, VOCAB, rng.integers(5, 41)).tolist()
             for _ in range(rng.integers(20, 201))] for _ in range(n_docs)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def rate(step, seconds: float) -> float:
    """Sequences/s of `step()` (which returns how many it made), run for about `seconds`."""
    step()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += step()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--docs-per-call", type=int, default=32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    corpus = synthetic_corpus(rng, 512)
    chunks = [corpus[i:i + args.docs_per_call] for i in range(0, len(corpus), args.docs_per_call)]
    masking = dict(vocab_size=VOCAB, mask_token_id=MASK, max_predictions=round(0.15 * args.seq))
    batch = nsp_instances(corpus[:64], rng, max_seq_length=args.seq, cls_id=CLS, sep_id=SEP,
                          pad_id=PAD)
    calls = itertools.count()

    def plain(out):
        return mask_tokens(out["input_ids"], out["special_tokens_mask"], rng, **masking)

    def whole_word(out):  # synthetic word starts (1 in 4 tokens a `##`), as a vocab lookup would
        starts = rng.random(out["input_ids"].shape) < 0.75
        return mask_tokens(out["input_ids"], out["special_tokens_mask"], rng, **masking,
                           whole_word_starts=starts)

    def spans(out):
        return span_mask(out["input_ids"], out["special_tokens_mask"], rng, vocab_size=VOCAB,
                         mask_token_id=MASK)

    def step(mask_fn=None, fresh=True):
        """One loader step: NSP instances from the next documents (or the fixed `batch`),
        then `mask_fn` on them; returns the number of sequences."""
        out = batch
        if fresh:
            docs = chunks[next(calls) % len(chunks)]
            out = nsp_instances(docs, rng, max_seq_length=args.seq, cls_id=CLS, sep_id=SEP,
                                pad_id=PAD)
        if mask_fn:
            mask_fn(out)
        return len(out["input_ids"])

    rows = [
        ("NSP instances", step),
        ("mask_tokens (batch)", lambda: step(plain, fresh=False)),
        ("mask_tokens whole-word (batch)", lambda: step(whole_word, fresh=False)),
        ("span_mask (batch)", lambda: step(spans, fresh=False)),
        ("NSP instances + mask_tokens", lambda: step(plain)),
        ("NSP instances + whole-word mask_tokens", lambda: step(whole_word)),
    ]
    print(f"Host input pipeline, seq {args.seq}, 1 process on {cpu_name()}, "
          f"numpy {np.__version__}, python {platform.python_version()}; "
          f"batch of {len(batch['input_ids'])} for masking-only rows, "
          f"{args.docs_per_call} documents per NSP call\n")
    print("| stage | sequences/s |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {rate(fn, args.seconds):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
