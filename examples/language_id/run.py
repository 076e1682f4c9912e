"""Language identification (sv / nb / da / en) end to end, from the gettext catalogs under
/usr/share/locale: data, WordPiece tokenizer, tiny BERT pretraining, fine-tuning, test score.

    python examples/language_id/run.py [--out runs/language_id]

Each stage is the `bert-jax` command the README shows, run in this process; the recipes are
`pretrain.yaml` and `finetune.yaml` beside this file, with `--pretrain-set` / `--finetune-set`
overrides (e.g. fewer steps for a quick run, as tests/test_language_id.py does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from make_data import make_data, summary
from scoring import evaluate, report

from bert_jax.cli import main as bert_jax
from bert_jax.errors import BertJaxError

HERE = Path(__file__).resolve().parent


def run(out: str | Path, *, domains: list[str] | None = None, vocab_size: int = 4000,
        pretrain_sets: list[str] = (), finetune_sets: list[str] = ()) -> dict:
    """Every stage into `out` (replacing earlier results); returns the test metrics."""
    out = Path(out)
    data, tokenizer, pretrain, finetune = (out / "data", out / "tokenizer", out / "pretrain",
                                           out / "finetune")
    print(summary(make_data("/usr/share/locale", data, domains=domains, overwrite=True)))
    _command("train-tokenizer", data / "pretrain_train.txt", "--out", tokenizer,
             "--vocab-size", vocab_size, "--overwrite")
    for split in ("train", "validation"):
        shutil.rmtree(out / "pretrain_data" / split, ignore_errors=True)  # else it resumes
        _command("prepare-data", data / f"pretrain_{split}.txt", "--out",
                 out / "pretrain_data" / split, "--tokenizer", tokenizer, "--quiet")
    for run_dir in (pretrain, finetune):
        shutil.rmtree(run_dir, ignore_errors=True)  # a run directory with checkpoints resumes
    _command("pretrain", "--config", HERE / "pretrain.yaml", "--tokenizer", tokenizer, "--quiet",
             *_sets(f"data.train={out / 'pretrain_data' / 'train'}",
                    f"data.eval={out / 'pretrain_data' / 'validation'}",
                    f"train.output_dir={pretrain}", *pretrain_sets))
    _command("finetune", "--config", HERE / "finetune.yaml", "--quiet",
             *_sets(f"model.init_from={pretrain / 'hf'}", f"data.train={data / 'train.jsonl'}",
                    f"data.eval={data / 'validation.jsonl'}", f"train.output_dir={finetune}",
                    *finetune_sets))
    metrics = evaluate(finetune / "hf", data / "test.jsonl", data / "train.jsonl")
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _command(*args) -> None:
    """`bert-jax ARGS`, echoed; a failure stops the run (the command printed why)."""
    args = [str(a) for a in args]
    print("+ bert-jax " + " ".join(args), flush=True)
    if bert_jax(args) != 0:
        raise BertJaxError(f"bert-jax {args[0]} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/language_id", help="working directory")
    parser.add_argument("--domains", nargs="+", help="only these catalog domains (quick runs)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of pretrain.yaml (repeatable)")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of finetune.yaml (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        metrics = run(args.out, domains=args.domains, vocab_size=args.vocab_size,
                      pretrain_sets=args.pretrain_set, finetune_sets=args.finetune_set)
    except BertJaxError as err:
        print(f"run: error: {err}", file=sys.stderr)
        return 1
    print(report(metrics))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
