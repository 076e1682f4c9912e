"""Score a fine-tuned language identifier on a held-out split: accuracy against the
majority-class baseline (the train split's most common label, predicted for every text),
accuracy per language, and the confusion matrix.

    python examples/language_id/scoring.py --model runs/language_id/finetune/hf \
        --test runs/language_id/data/test.jsonl --train runs/language_id/data/train.jsonl

Texts are cut to `--max-length` tokens as fine-tuning cut them (default: the model's limit).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import jax
import numpy as np

from bert_jax.data.encoding import encode
from bert_jax.data.finetune_files import read_table
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import from_pretrained


def predict(model_dir: str | Path, texts: list[str], max_length: int | None = None,
            batch_size: int = 64) -> list[str]:
    """The model's label for each text."""
    model = from_pretrained(model_dir)
    if model.config.head != "ForSequenceClassification" or not model.config.labels:
        raise BertJaxError(f"{model_dir}: not a sequence classifier with labels "
                           f"({model.config.architecture})")
    encodings = encode(load_tokenizer(model_dir), texts,
                       max_length=max_length or model.config.max_length[1])
    best = run_in_buckets(model, encodings, jax.jit(lambda out, inputs: out.logits.argmax(-1)),
                          batch_size=batch_size)
    return [model.config.labels[int(i)] for i in best]


def score(gold: list[str], predicted: list[str], majority: str) -> dict:
    """Accuracy, the majority baseline's, per-language accuracy and the confusion matrix
    (rows: true language, columns: predicted, in the order of `labels`)."""
    labels = sorted(set(gold) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), int)
    np.add.at(confusion, ([index[g] for g in gold], [index[p] for p in predicted]), 1)
    return {"examples": len(gold),
            "accuracy": float(np.trace(confusion) / len(gold)),
            "majority_label": majority,
            "majority_accuracy": gold.count(majority) / len(gold),
            "per_label_accuracy": {label: float(confusion[i, i] / max(confusion[i].sum(), 1))
                                   for label, i in index.items()},
            "labels": labels,
            "confusion": confusion.tolist()}


def report(metrics: dict) -> str:
    labels = metrics["labels"]
    lines = [f"test accuracy {metrics['accuracy']:.4f} on {metrics['examples']} texts; "
             f"majority class ({metrics['majority_label']}) {metrics['majority_accuracy']:.4f}",
             "per language: " + ", ".join(f"{label} {acc:.4f}" for label, acc in
                                          metrics["per_label_accuracy"].items()),
             "confusion (rows: true, columns: predicted):",
             "      " + "".join(f"{label:>7}" for label in labels)]
    lines += [f"{label:>6}" + "".join(f"{n:>7}" for n in row)
              for label, row in zip(labels, metrics["confusion"])]
    return "\n".join(lines)


def evaluate(model_dir: str | Path, test: str | Path, train: str | Path,
             max_length: int | None = None) -> dict:
    examples = read_table(test)
    majority = collections.Counter(r.get("label") for r in read_table(train)).most_common(1)[0][0]
    predicted = predict(model_dir, [r.get("text") for r in examples], max_length)
    return score([r.get("label") for r in examples], predicted, majority)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the fine-tuned HF directory")
    parser.add_argument("--test", required=True, help="a .jsonl/.csv split with text, label")
    parser.add_argument("--train", required=True, help="the train split (for the majority class)")
    parser.add_argument("--max-length", type=int, help="tokens per text (default: the model's)")
    parser.add_argument("--json", help="also write the metrics to this file")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(args.model, args.test, args.train, args.max_length)
    except BertJaxError as err:
        print(f"scoring: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    print(report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
