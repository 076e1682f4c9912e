"""Fine-tuning train step, packed rows vs padded batches: real (non-padding) tokens per second.

    python -m benchmarks.packing [--model mini|base] [--steps 10] [--rounds 3] [--max-length 128]

Sequence classification on SST-2-like lengths (5..60 tokens, median 20; random token ids,
nothing is downloaded) at max_length 128, one train step of `bert-jax finetune` (AdamW,
dropout on) per batch, on the default device. Three layouts of the same examples:
padded to max_length, padded to each batch's bucket (`data.batching`, the default), and
packed (`data.pack: true`, `data.packing`), with about as many token slots per step
(32 examples vs 16 rows of 128). Every batch shape is compiled before timing, then the
layouts are timed in turn for `--rounds` rounds (the median counts). Prints a markdown
table: real tokens/s, examples/s, the share of slots that is padding, and the speed-up in
real tokens/s over bucketed padding.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from benchmarks.input_pipeline import cpu_name
from bert_jax import sharding
from bert_jax.data.batching import Features, batches, bucket_lengths
from bert_jax.data.packing import pack, packed_batches
from bert_jax.modeling.presets import preset
from bert_jax.training.loop import global_batch
from bert_jax.training.optimizer import OptimizerConfig, build_optimizer
from bert_jax.training.train_step import create_train_state, make_train_step

MODELS = {  # BERT-mini (google/bert_uncased_L-4_H-256_A-4's shape) and BERT-base
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024),
    "base": {},
}


def sst2_like(n: int, vocab: int, seed: int = 0) -> Features:
    """`n` single-sentence examples, [CLS] ... [SEP] of 5..60 tokens (log-normal, median 20)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(20), 0.5, n), 5, 60).astype(int)
    ids = [rng.integers(1000, vocab, size).astype(np.int32) for size in lengths]
    return Features(ids, [np.zeros(size, np.int32) for size in lengths],
                    rng.integers(0, 2, n).astype(np.int32))


def train_seconds(step, state, batch_list):
    """(seconds to train on `batch_list`, the state after)."""
    start = time.perf_counter()
    for batch in batch_list:
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mini")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4096)
    args = parser.parse_args()

    config = preset("bert-base-cased", **MODELS[args.model]).with_head(
        "ForSequenceClassification", 2)
    features = sst2_like(args.examples, config.vocab_size)
    lengths = [len(ids) for ids in features.input_ids]
    common = dict(pad_id=0, seed=0, num_epochs=None, drop_remainder=True)
    layouts = {  # the first is the baseline
        "padded to buckets": batches(
            features, batch_size=32, buckets=bucket_lengths(args.max_length), **common),
        f"padded to {args.max_length}": batches(
            features, batch_size=32, buckets=(args.max_length,), **common),
        "packed": packed_batches(features, pack(lengths, args.max_length), batch_size=16,
                                 max_length=args.max_length, **common),
    }
    mesh = sharding.make_mesh()
    optimizer = build_optimizer(OptimizerConfig(learning_rate=2e-5, warmup_steps=0,
                                                total_steps=10 * args.steps))
    step = make_train_step(config, optimizer, mesh)
    state = create_train_state(config, optimizer, mesh, seed=0)
    host = {name: [next(stream) for _ in range(args.steps)] for name, stream in layouts.items()}
    device = {name: [global_batch(b, sharding.batch_sharding(mesh, 1)) for b in batch_list]
              for name, batch_list in host.items()}
    seconds = {name: [] for name in layouts}
    with jax.set_mesh(mesh):
        for batch_list in device.values():  # compile every shape
            for one_of_a_shape in {b["input_ids"].shape: b for b in batch_list}.values():
                _, state = train_seconds(step, state, [one_of_a_shape])
        for _ in range(args.rounds):  # the layouts in turn, so a busy machine slows them alike
            for name, batch_list in device.items():
                elapsed, state = train_seconds(step, state, batch_list)
                seconds[name].append(elapsed)

    print(f"# {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), "
          f"max_length {args.max_length}, {args.steps} steps a layout, median of "
          f"{args.rounds} rounds; {cpu_name()}, {jax.devices()[0].platform}, "
          f"jax {jax.__version__}, python {platform.python_version()}")
    print("| layout | batch | real tokens/s | examples/s | padding | vs buckets |")
    print("|---|---|---:|---:|---:|---:|")
    baseline = None
    for name, batch_list in host.items():
        elapsed = float(np.median(seconds[name]))
        real = sum(int(b["attention_mask"].sum()) for b in batch_list)
        slots = sum(b["attention_mask"].size for b in batch_list)
        examples = sum(int((b["example_id"] >= 0).sum()) for b in batch_list)
        rate = real / elapsed
        baseline = baseline or rate
        rows = batch_list[0]["input_ids"].shape[0]
        size = f"{rows} rows" if name == "packed" else f"{rows} examples"
        print(f"| {name} | {size} | {rate:,.0f} | {examples / elapsed:,.1f} | "
              f"{1 - real / slots:.1%} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
