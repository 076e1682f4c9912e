"""The `bert-jax` command.

Bad input ends with one line, `bert-jax: error: ...`, and exit status 1; no partial output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bert_jax.errors import BertJaxError


def _size(text: str) -> int:
    """'5GB', '200MB', '1000' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 200MB)")


def cmd_convert(args) -> None:
    from bert_jax.convert.hf_dir import is_hf_dir
    from bert_jax.pretrained import from_pretrained
    from bert_jax.training.checkpointing import is_orbax_dir

    src = Path(args.src)
    if not src.is_dir():
        raise BertJaxError(f"{src}: no such directory")
    target = args.to or ("orbax" if is_hf_dir(src) else "hf" if is_orbax_dir(src) else None)
    if target is None:
        raise BertJaxError(f"{src}: neither a Hugging Face nor a bert_jax Orbax model directory")
    if Path(args.dst).exists() and not args.overwrite:
        raise BertJaxError(f"{args.dst}: already exists (pass --overwrite to replace it)")
    model = from_pretrained(src)
    model.save_pretrained(args.dst, format=target, max_shard_size=args.max_shard_size)
    print(f"wrote {target} checkpoint of {model.config.architecture} to {args.dst}")


def cmd_fill_mask(args) -> None:
    from bert_jax.data.tokenizer import load_tokenizer
    from bert_jax.inference.fill_mask import fill_mask
    from bert_jax.pretrained import from_pretrained

    model = from_pretrained(args.model)
    results = fill_mask(model, load_tokenizer(args.model), args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    per_mask = [results] if isinstance(results[0], dict) else results
    for i, predictions in enumerate(per_mask):
        if len(per_mask) > 1:
            print(f"mask {i + 1}:")
        for p in predictions:
            print(f"{p['score']:.4f}  {p['token_str']:<15}  {p['sequence']}")


def cmd_generate(args) -> None:
    from bert_jax.data.tokenizer import load_tokenizer
    from bert_jax.inference.generate import Sampling, causal_model, generate
    from bert_jax.pretrained import from_pretrained

    model = causal_model(from_pretrained(args.model))
    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    sampling = Sampling(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)
    [new_ids] = generate(model, [prompt_ids], args.max_new_tokens, sampling=sampling,
                         seed=args.seed)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "generated_ids": new_ids,
                          "text": tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)},
                         ensure_ascii=False))
    else:
        print(tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True))


def cmd_train_tokenizer(args) -> None:
    from bert_jax.data.train_tokenizer import lines_of, train_wordpiece

    out = train_wordpiece(lines_of(args.inputs), args.out, vocab_size=args.vocab_size,
                          lowercase=args.lowercase, min_frequency=args.min_frequency,
                          overwrite=args.overwrite)
    print(f"wrote a WordPiece tokenizer to {out}")


def cmd_prepare_data(args) -> None:
    from bert_jax.data.prepare import prepare_corpus

    manifest = prepare_corpus(args.inputs, args.out, args.tokenizer, doc_mode=args.doc_mode,
                              text_field=args.text_field, records_per_shard=args.records_per_shard,
                              workers=args.workers, progress=not args.quiet)
    print(f"wrote {manifest.documents:,} documents, {manifest.tokens:,} tokens in "
          f"{len(manifest.shards)} shards to {args.out}"
          + (f" ({len(manifest.problems)} problems reported)" if manifest.problems else ""))


def cmd_pretrain(args) -> None:
    from bert_jax.training.recipe import load_recipe
    from bert_jax.training.trainer import pretrain

    recipe = load_recipe(args.config, args.set or [])
    metrics = pretrain(recipe, args.tokenizer, resume=args.resume, progress=not args.quiet)
    print(json.dumps(metrics))


def cmd_demo(args) -> None:
    from bert_jax.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bert-jax",
        description="Pretrain, fine-tune, convert and serve BERT-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert between Hugging Face and Orbax directories",
                       description="Convert a model directory. The direction follows SRC's format "
                       "(HF -> Orbax, Orbax -> HF) unless --to is given.")
    p.add_argument("src", help="a Hugging Face model directory or a bert_jax Orbax directory")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", choices=("hf", "orbax"), help="output format")
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="shard HF safetensors above this size, e.g. 5GB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("fill-mask", help="predict the masked tokens of a text",
                       description="Top-k predictions for each mask token, as the transformers "
                       "fill-mask pipeline.")
    p.add_argument("--model", required=True, help="model directory (HF or Orbax) with tokenizer")
    p.add_argument("text", help='e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5, help="predictions per mask (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("generate", help="continue a prompt with a GPT-BERT model (causal mode)",
                       description="Generate with a KV cache; greedy unless --do-sample. Stops at "
                       "the config's eos token or after --max-new-tokens.")
    p.add_argument("--model", required=True, help="GPT-BERT directory (HF or Orbax) with tokenizer")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print ids and text as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train-tokenizer", help="train a WordPiece tokenizer on text files",
                       description="Train BERT's WordPiece tokenizer (cased unless --lowercase) "
                       "and save tokenizer.json, vocab.txt and tokenizer_config.json.")
    p.add_argument("inputs", nargs="+", help="text files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--lowercase", action="store_true", help="an uncased tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare-data", help="tokenize text corpora into ArrayRecord shards",
                       description="Turn .txt / .jsonl corpora (gzip ok, globs ok) into tokenized "
                       "ArrayRecord shards with a manifest. Restartable: finished files are "
                       "skipped on a rerun. Bad lines and files are reported and skipped.")
    p.add_argument("inputs", nargs="+", help="files or glob patterns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json or vocab.txt")
    p.add_argument("--doc-mode", choices=("blank-line", "line"), default="blank-line",
                   help="blank-line: documents separated by blank lines, one sentence per line "
                   "(BERT's format); line: one document per line")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    p.add_argument("--records-per-shard", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=None, help="processes (default min(4, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("pretrain", help="pretrain (or continue pretraining) a BERT model",
                       description="Pretrain with MLM (+ NSP) as a recipe says; checkpoints, logs "
                       "and an HF export land in the recipe's train.output_dir.")
    p.add_argument("--config", required=True, help="a recipe YAML, e.g. configs/tiny-mlm.yaml")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the data was prepared with")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="build a tiny model, convert it both ways and fill a mask",
                       description="End to end on an embedded default: train a tiny WordPiece "
                       "tokenizer, create a tiny random BERT, save it in Hugging Face format, "
                       "convert to Orbax and back (checked bit-identical), then run fill-mask.")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BertJaxError as err:
        print(f"bert-jax: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
