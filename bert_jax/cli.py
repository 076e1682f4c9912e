"""The `bert-jax` command.

Bad input ends with one line, `bert-jax: error: ...`, and exit status 1; no partial output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    from bert_jax.tools.convert import convert

    result = convert(args.src, args.dst, to=args.to, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                     verify_output=args.verify, tolerance=args.tolerance, progress=not args.quiet)
    if result.verification is not None:
        print(result.verification.summary())
    print(f"wrote {result.target_format} checkpoint of {result.config.architecture} to {args.dst}")


def cmd_inspect(args) -> None:
    from bert_jax.tools.inspect import inspect_dir

    print(inspect_dir(Path(args.dir)).report())


def cmd_fill_mask(args) -> None:
    from bert_jax.data.tokenizer import load_tokenizer
    from bert_jax.inference.fill_mask import fill_mask
    from bert_jax.inference.predict import format_text
    from bert_jax.pretrained import from_pretrained

    model = from_pretrained(args.model)
    results = fill_mask(model, load_tokenizer(model.source_dir), args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    print(format_text("fill-mask", [args.text], [results]))


def cmd_predict(args) -> None:
    from bert_jax.inference.predict import format_text, predict

    inputs = list(args.inputs) + list(args.question or [])
    if args.file is not None:
        inputs += _lines_of(sys.stdin if args.file == "-" else args.file)
    elif not inputs and not sys.stdin.isatty():
        inputs = _lines_of(sys.stdin)
    results = predict(args.task, args.model, inputs, top_k=args.top_k,
                      aggregation=args.aggregation, pooling=args.pooling,
                      normalize=not args.no_normalize, context=args.context,
                      batch_size=args.batch_size, truncation=args.truncation)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(format_text(args.task, inputs, results))


def _lines_of(source) -> list[str]:
    """The non-empty lines of a file path or an open text stream."""
    if isinstance(source, str):
        try:
            source = open(source, encoding="utf-8")
        except OSError as err:
            raise BertJaxError(f"{err.filename}: {err.strerror}") from None
    try:
        with source:
            return [line.rstrip("\r\n") for line in source if line.strip()]
    except UnicodeDecodeError as err:
        raise BertJaxError(f"{getattr(source, 'name', 'input')}: not UTF-8 text ({err})") from None


def cmd_generate(args) -> None:
    from bert_jax.data.tokenizer import load_tokenizer
    from bert_jax.inference.generate import Sampling, causal_model, generate
    from bert_jax.pretrained import from_pretrained

    model = causal_model(from_pretrained(args.model))
    tokenizer = load_tokenizer(model.source_dir)  # a Hub id resolves to its download
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
    from bert_jax.data.train_tokenizer import lines_of, train_sentencepiece, train_wordpiece

    if args.type == "wordpiece":
        out = train_wordpiece(lines_of(args.inputs), args.out, vocab_size=args.vocab_size,
                              lowercase=args.lowercase, min_frequency=args.min_frequency,
                              overwrite=args.overwrite)
        print(f"wrote a WordPiece tokenizer to {out}")
    else:
        out = train_sentencepiece(lines_of(args.inputs), args.out, model_type=args.type,
                                  vocab_size=args.vocab_size, lowercase=args.lowercase,
                                  character_coverage=args.character_coverage,
                                  input_sentence_size=args.max_sentences, overwrite=args.overwrite)
        print(f"wrote a SentencePiece {args.type} tokenizer to {out}")


def cmd_prepare_data(args) -> None:
    from bert_jax.data.prepare import prepare_corpus

    manifest = prepare_corpus(args.inputs, args.out, args.tokenizer, doc_mode=args.doc_mode,
                              text_field=args.text_field, records_per_shard=args.records_per_shard,
                              workers=args.workers, progress=not args.quiet)
    print(f"wrote {manifest.documents:,} documents, {manifest.tokens:,} tokens in "
          f"{len(manifest.shards)} shards to {args.out}"
          + (f" ({len(manifest.problems)} problems reported)" if manifest.problems else ""))


def _distributed(args) -> contextlib.AbstractContextManager:
    """Multi-host runs: join before anything touches a device, leave together at the end
    (see bert_jax.distributed); a no-op for a single process."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in explicit):
        from bert_jax.distributed import joined

        return joined(*explicit)
    return contextlib.nullcontext()


def _training_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """What `pretrain` and `finetune` share: the recipe, overrides, resuming, multi-host."""
    p.add_argument("--config", required=True, help=f"a recipe YAML, e.g. {example}")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = p.add_argument_group("multi-host", "one process per host, all given the same command")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run found automatically (Cloud TPU VMs, SLURM)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, elsewhere (with the next two)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group = p.add_argument_group("compile only", "compile the recipe's train step and report "
                                 "its memory, FLOPs and collectives instead of training (as "
                                 "`bert-jax compile`)")
    group.add_argument("--compile-only", action="store_true", help="compile, do not train")
    _compile_arguments(group)


def _compile_arguments(p) -> None:
    p.add_argument("--topology", metavar="CHIP:AxB[xC]",
                   help="a TPU slice to compile for, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x4 "
                   "(needs libtpu, not the TPU); default: this machine's devices")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")


def _compile(args, recipe, tokenizer_dir: str | None = None, model: str | None = None) -> int:
    """Compile the recipe's train step and print the report; 1 when it does not fit."""
    import jax

    from bert_jax.training.compile import compile_recipe

    report = compile_recipe(recipe, topology=args.topology, tokenizer_dir=tokenizer_dir,
                            model=model, name=args.config)
    if jax.process_index() == 0:
        print(report.format())
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n",
                                       encoding="utf-8")
    return 1 if report.fits is False else 0


def cmd_pretrain(args) -> int:
    from bert_jax.training.pretrain import pretrain
    from bert_jax.training.recipe import load_recipe

    with _distributed(args):
        recipe = load_recipe(args.config, args.set or [])
        if args.compile_only:
            return _compile(args, recipe, args.tokenizer)
        metrics = pretrain(recipe, args.tokenizer, resume=args.resume, progress=not args.quiet)
    print(json.dumps(metrics))
    return 0


def cmd_finetune(args) -> int:
    from bert_jax.training.finetune import FinetuneRecipe, finetune
    from bert_jax.training.recipe import load_recipe

    with _distributed(args):
        recipe = load_recipe(args.config, args.set or [], FinetuneRecipe)
        if args.compile_only:
            return _compile(args, recipe)
        metrics = finetune(recipe, resume=args.resume, progress=not args.quiet)
    print(json.dumps(metrics))
    return 0


def cmd_compile(args) -> int:
    from bert_jax.training.compile import load_any_recipe

    return _compile(args, load_any_recipe(args.config, args.set or []), args.tokenizer,
                    args.model)


def _libtpu_without_tpu() -> None:
    """libtpu installed (for `compile --topology`) on a machine without TPU chips. JAX's start
    tries the TPU runtime, which looks for TPU VM metadata, prints warnings and leaves JAX on
    the CPU: naming an accelerator type and this host keeps it quiet. libtpu also lets only
    one process at a time load it (a lock file), which guards chips there are none of here:
    several compiles may run at once. Nothing else changes, and nothing is set where a Google
    PCI device (a TPU chip) is attached."""
    import glob
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError), open(vendor) as f:
            if f.read().strip() == "0x1ae0":
                return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def cmd_export(args) -> None:
    from bert_jax.training.export import export_checkpoint

    step = export_checkpoint(args.run_dir, args.out, args.step, format=args.format,
                             overwrite=args.overwrite)
    print(f"wrote the {args.format} model of step {step} of {args.run_dir} to {args.out}")


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
    p.add_argument("--dtype", choices=("fp32", "bf16"),
                   help="dtype of the written weights (default: HF output keeps the source's, "
                   "Orbax output is fp32)")
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="shard HF safetensors above this size, e.g. 5GB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run SRC and the conversion on random inputs (transformers on the HF "
                   "side when installed, bert_jax on the other) and print the max abs "
                   "difference; DST is not written if it is above the tolerance")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs difference --verify accepts (default 1e-4; 5%% of each "
                   "output's scale when the weights were rounded, e.g. to bf16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="show what a model directory holds and how it converts",
                       description="Architecture, parameter count, dtypes, a table of tensors "
                       "and shapes with the name each converts to, tied weights, and stored "
                       "tensors that conversion would ignore or need. Reads only metadata "
                       "(safetensors headers, Orbax tree metadata).")
    p.add_argument("dir", help="a Hugging Face model directory or a bert_jax Orbax directory")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fill-mask", help="predict the masked tokens of a text",
                       description="Top-k predictions for each mask token, as the transformers "
                       "fill-mask pipeline.")
    p.add_argument("--model", required=True, help="model directory (HF or Orbax) with tokenizer")
    p.add_argument("text", help='e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5, help="predictions per mask (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("predict", help="run an inference pipeline (NER, classification, QA, ...)",
                       description="Run a task's pipeline, with the results of the transformers "
                       "pipeline of the same name. Inputs are the arguments and the lines of "
                       "--file (- for stdin); with neither, the lines of stdin.")
    p.add_argument("--task", required=True, help="fill-mask, ner, text-classification, "
                   "question-answering or embeddings")
    p.add_argument("--model", required=True, help="model directory (HF or Orbax) with tokenizer")
    p.add_argument("inputs", nargs="*", help="texts (questions for question-answering)")
    p.add_argument("--file", help="a UTF-8 file with one input per line (- for stdin)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, help="fill-mask: predictions per mask (default 5); "
                   "text-classification: labels (1); question-answering: answers (1)")
    p.add_argument("--aggregation", default="none", help="ner: how tokens are grouped into "
                   "entities: none (default), simple, first, average or max")
    p.add_argument("--pooling", default="mean", help="embeddings: mean (default) or cls")
    p.add_argument("--no-normalize", action="store_true", help="embeddings: keep their length")
    p.add_argument("--question", action="append", help="question-answering: a question "
                   "(repeatable; same as giving it as an input)")
    p.add_argument("--context", help="question-answering: the text the answers come from")
    p.add_argument("--truncation", action="store_true", help="text-classification: cut texts "
                   "longer than the model's positions instead of stopping with an error")
    p.set_defaults(func=cmd_predict)

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

    p = sub.add_parser("train-tokenizer", help="train a WordPiece or SentencePiece tokenizer",
                       description="Train BERT's WordPiece tokenizer or a SentencePiece unigram "
                       "or BPE model (cased unless --lowercase), with BERT's special tokens at "
                       "ids 0-4. Saves tokenizer.json and tokenizer_config.json, plus vocab.txt "
                       "(WordPiece) or tokenizer.model (SentencePiece).")
    p.add_argument("inputs", nargs="+", help="text files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--type", choices=("wordpiece", "unigram", "bpe"), default="wordpiece",
                   help="WordPiece (default) or a SentencePiece unigram or BPE model")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--min-frequency", type=int, default=2, help="WordPiece only")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="SentencePiece only: the share of characters the vocabulary covers; "
                   "rarer ones become [UNK] (default 0.9995)")
    p.add_argument("--max-sentences", type=int, default=0,
                   help="SentencePiece only: train on a random sample of this many lines "
                   "(default 0: all, held in memory)")
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
                       description="Pretrain as a recipe says (BERT: MLM + NSP; GPT-BERT: masked "
                       "next-token + causal); checkpoints, logs (JSONL, TensorBoard) and an HF "
                       "export land in the recipe's train.output_dir.")
    _training_arguments(p, "configs/tiny-mlm.yaml")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the data was prepared with")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a model on a task (classification, NER, "
                       "QA, multiple choice)",
                       description="Fine-tune a checkpoint as a recipe says: sequence "
                       "classification, token classification, extractive QA or multiple choice "
                       "(data.task). Evaluates every train.eval_every steps, keeps the best "
                       "model, and exports it (HF format, with its labels and tokenizer) to "
                       "train.output_dir/hf.")
    _training_arguments(p, "configs/finetune-sst2.yaml")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compile", help="compile a recipe's train step for a TPU slice and "
                       "report memory, FLOPs and collectives",
                       description="Compile the train step of a pretraining or fine-tuning "
                       "recipe ahead of time, for a TPU topology this machine need not have "
                       "(libtpu compiles for it) or for this machine's devices, without reading "
                       "data. Prints, per chip, the bytes the step holds against the chip's HBM "
                       "(FITS / DOES NOT FIT; exit status 1 when it does not fit), the FLOPs "
                       "per step, the XLA cost model's step time and the MFU it implies (an "
                       "estimate, not a measurement), and the collectives of the partitioned "
                       "program.")
    p.add_argument("--config", required=True, help="a pretraining or fine-tuning recipe YAML, "
                   "e.g. configs/bert-base-cased-phase1.yaml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable)")
    _compile_arguments(p)
    p.add_argument("--tokenizer", metavar="DIR", help="pretraining from a preset: the tokenizer "
                   "whose vocabulary the run will have (default: the preset's vocabulary size)")
    p.add_argument("--model", metavar="PRESET_OR_DIR", help="the model the recipe's init_from "
                   "checkpoint holds, when that is not on this machine: a preset name (e.g. "
                   "bert-base-cased) or a model directory")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("export", help="export a training checkpoint as a model directory",
                       description="Write the model of any saved step of a pretrain or "
                       "finetune run (default: the newest complete one) as the run's own "
                       "export would be: a Hugging Face directory with the tokenizer, or a "
                       "bert_jax Orbax directory. Restores onto this machine's devices, "
                       "whatever mesh trained it.")
    p.add_argument("run_dir", help="a pretrain or finetune run directory (train.output_dir)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf",
                   help="Hugging Face (default) or bert_jax Orbax")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="build a tiny model, convert it both ways and fill a mask",
                       description="End to end on an embedded default: train a tiny WordPiece "
                       "tokenizer, create a tiny random BERT, save it in Hugging Face format, "
                       "convert to Orbax and back (checked bit-identical), then run fill-mask.")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _libtpu_without_tpu()
    try:
        status = args.func(args)
    except BertJaxError as err:
        print(f"bert-jax: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `bert-jax inspect DIR | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
