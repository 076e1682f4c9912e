"""Fill-mask: bert_jax's `fill_mask` against transformers' pipeline("fill-mask"), in one run.

    python -m benchmarks.fill_mask [--model bert-base-cased] [--texts 64] [--batch-size 32]
                                   [--rounds 3]

A random BertForMaskedLM of the preset's shape (transformers, fp32, nothing downloaded) with a
WordPiece vocabulary of synthetic whole words, saved in a temporary directory; texts of 8 to 120
words (fewer where the model's limit is lower) with one or two [MASK] each, the same list for
both. Each side runs the list once untimed (bert_jax compiles its length buckets then), then
`--rounds` times; the median counts. bert_jax computes the vocabulary logits at the masks only
(`masked_positions`), the pipeline at every position, as transformers does. Prints texts/s,
tokens/s (real tokens) and the ratio, and checks that both rank the same top token first at
every mask.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.convert_speed import build_checkpoint
from benchmarks.input_pipeline import cpu_name
from benchmarks.timing import timings

SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def write_vocabulary(model_dir: Path, vocab_size: int) -> None:
    """bert-base-cased's special ids, `[unused]` slots below them, words `w104`... above."""
    tokens = [SPECIAL.get(i, f"[unused{i}]" if i < 100 else f"w{i}") for i in range(vocab_size)]
    (model_dir / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))


def make_texts(count: int, vocab_size: int, most_words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        words = [f"w{i}" for i in rng.integers(104, vocab_size, rng.integers(8, most_words + 1))]
        for position in rng.choice(len(words), rng.integers(1, 3), replace=False):
            words[position] = "[MASK]"
        texts.append(" ".join(words))
    return texts


def top_tokens(results) -> list[int]:
    """The first-ranked token of every mask, in order (one text with one mask is a list of
    predictions; with several, a list of such lists)."""
    per_text = [r if isinstance(r[0], list) else [r] for r in results]
    return [mask[0]["token"] for text in per_text for mask in text]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-cased", help="a BERT preset name")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import torch
    import transformers

    import bert_jax
    from bert_jax.data.encoding import encode
    from bert_jax.data.tokenizer import load_tokenizer
    from bert_jax.inference.fill_mask import fill_mask

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        build_checkpoint(args.model, model_dir)
        config = bert_jax.preset(args.model)
        write_vocabulary(model_dir, config.vocab_size)
        texts = make_texts(args.texts, config.vocab_size, min(120, config.max_length[1] - 2))

        model, tokenizer = bert_jax.from_pretrained(model_dir), load_tokenizer(model_dir)
        pipe = transformers.pipeline("fill-mask", model=str(model_dir), device="cpu")
        runs = {
            "bert_jax fill_mask": lambda: fill_mask(model, tokenizer, texts, top_k=5,
                                                    batch_size=args.batch_size),
            "transformers pipeline": lambda: pipe(texts, top_k=5, batch_size=args.batch_size),
        }
        tops = {name: top_tokens(run()) for name, run in runs.items()}
        with torch.inference_mode():
            seconds = {name: float(np.median(timings(run, 0, args.rounds)))
                       for name, run in runs.items()}
        tokens = sum(len(e.ids) for e in encode(tokenizer, texts))

    same = tops["bert_jax fill_mask"] == tops["transformers pipeline"]
    peer = seconds["transformers pipeline"]
    print(f"# fill-mask, {args.model} shape (random weights, fp32), {args.texts} texts of 8-"
          f"{min(120, config.max_length[1] - 2)} words, {tokens} tokens, 1-2 masks each, "
          f"batch {args.batch_size}; median of "
          f"{args.rounds}; {cpu_name()}, {platform.machine()}; jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print("| implementation | texts/s | tokens/s | x pipeline |")
    print("|---|---:|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {args.texts / s:.1f} | {tokens / s:.0f} | {peer / s:.2f}x |")
    print(f"\nsame top token at every mask: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
