"""bert_jax against Hugging Face PyTorch on the same weights, inputs, dtype and batch, in one run.

    python -m benchmarks.run --suite cpu|gpu|tpu [--model NAME ...] [--json OUT] [--quick]
                             [--workload forward|variable|train ...]
                             [--backend reference|jax|cudnn|splash ...]
                             [--peer eager|sdpa|compile ...] [--gpt-bert-code DIR]
    python -m benchmarks.run --show OUT

Prints one markdown table and writes JSON (machine, date, versions, command, rows). The JSON is
rewritten after every row, so a run stopped by a time limit keeps the rows it finished;
`--show` prints the table of such a file. Each
model (a preset, random weights, nothing downloaded) runs the suite's workloads:
- forward: MLM inference forward, every token real;
- variable: MLM inference over rows of lengths drawn uniformly from 32 to the longest; bert_jax
  batches them as its inference pipelines do (sorted, padded to power-of-two buckets), PyTorch
  as a `transformers` pipeline does (input order, each batch padded to its longest row);
  tokens/s counts real tokens only;
- train: one MLM train step, forward + backward + AdamW update, with dropout as the model
  configures it (0.1 for BERT) on both sides; bert_jax runs `training.train_step`'s real step,
  with the MLM head on the masked positions only as pretraining runs it (`masked_positions`,
  max_predictions_per_seq = 15% of the length), and again on every position ("all
  positions"), as `transformers` computes it. Both give the same loss.
Each implementation is warmed up (compilation excluded), then timed as the median of N calls
that block on the device (`block_until_ready` / `torch.cuda.synchronize`). "x best peer" is
tokens/s over the fastest PyTorch implementation's. MFU (accelerators only) is against the
chip's dense bf16 peak (`training.flops`; a forward costs a third of a training token).
Peak memory (accelerators only): bert_jax's is the compiled XLA program's plan (arguments +
temporaries + outputs - donated), PyTorch's `torch.cuda.max_memory_allocated`; on the CPU
neither is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from benchmarks import ours, peer
from benchmarks.timing import timings
from bert_jax.convert.families import family_of_config
from bert_jax.data.masking import IGNORE_INDEX, masked_positions
from bert_jax.errors import BertJaxError
from bert_jax.files import read_json
from bert_jax.modeling.config import ATTENTION_BACKENDS
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel
from bert_jax.training import flops

MLM_PROBABILITY = 0.15
WORKLOADS = ("forward", "variable", "train")


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str  # one of WORKLOADS
    batch: int
    seq: int  # the fixed length, or the longest row of a variable set
    rows: int = 0  # variable: how many rows

    def capped(self, max_length: int) -> Workload:
        return dataclasses.replace(self, seq=min(self.seq, max_length))

    @property
    def shape(self) -> str:
        if self.kind == "variable":
            return f"{self.rows} rows of 32..{self.seq}, batch {self.batch}"
        return f"{self.batch} x {self.seq}"


@dataclasses.dataclass(frozen=True)
class Suite:
    dtype: str
    models: tuple[str, ...]
    backends: tuple[str, ...]  # bert_jax attention backends
    peers: tuple[str, ...]  # peer.IMPLEMENTATIONS
    workloads: tuple[Workload, ...]
    warmup: int = 2
    iters: int = 5


FOUR_MODELS = ("bert-base-cased", "bert-large-cased", "bert-large-swedish-cased", "norbert4-base")
ACCELERATOR_WORKLOADS = (Workload("forward", 128, 128), Workload("forward", 32, 512),
                         Workload("variable", 32, 512, rows=512), Workload("train", 32, 512))
SUITES = {
    "cpu": Suite("float32", ("bert-base-cased",), ("reference",), ("eager", "sdpa"),
                 (Workload("forward", 8, 128), Workload("forward", 2, 512),
                  Workload("variable", 4, 512, rows=16), Workload("train", 8, 128)),
                 warmup=1, iters=5),
    "gpu": Suite("bfloat16", FOUR_MODELS, ("reference", "jax", "cudnn"), peer.IMPLEMENTATIONS,
                 ACCELERATOR_WORKLOADS, warmup=3, iters=10),
    # No PyTorch peer on TPU (torch_xla is not a transformers default); bert_jax rows only.
    "tpu": Suite("bfloat16", FOUR_MODELS, ("reference", "splash"), (), ACCELERATOR_WORKLOADS,
                 warmup=3, iters=10),
}


def make_inputs(workload: Workload, config, seed: int = 0) -> dict:
    """Random token ids (never special ids 0-4) and, for training, MLM labels on 15% of each
    row's positions, as the pretraining pipeline masks (-100 elsewhere, as `transformers`
    expects); variable sets are a list of rows."""
    rng = np.random.default_rng(seed)
    if workload.kind == "variable":
        lengths = rng.integers(min(32, workload.seq), workload.seq + 1, workload.rows)
        return {"rows": [rng.integers(5, config.vocab_size, n).astype(np.int32) for n in lengths]}
    ids = rng.integers(5, config.vocab_size, (workload.batch, workload.seq)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if workload.kind == "train":
        chosen = rng.random(ids.shape).argsort(axis=1) < round(MLM_PROBABILITY * workload.seq)
        inputs["labels"] = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
    return inputs


def max_predictions(seq: int) -> int:
    """The pretraining recipes' `max_predictions_per_seq` for this length (20 at 128)."""
    return math.ceil(MLM_PROBABILITY * seq)


def tokens_of(inputs: dict) -> int:
    if "rows" in inputs:
        return sum(len(r) for r in inputs["rows"])
    return int(inputs["attention_mask"].sum())


def measure(name: str, side: str, build, suite: Suite, tokens: int, flops_per_token: float):
    """Time the callable `build()` returns (with its planned/peak memory); an implementation
    that cannot run here (an absent backend, no remote code) becomes a row with its error."""
    result = {"implementation": name, "side": side}
    try:
        peer.reset_peak_memory()
        fn, memory = build()
        seconds = timings(fn, suite.warmup, suite.iters)
    except Exception as err:  # reported in the table, the suite goes on
        return result | {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    median = float(np.median(seconds))
    peak = flops.peak_flops()
    return result | {
        "seconds": seconds, "seconds_median": median, "tokens_per_second": tokens / median,
        "spread": (max(seconds) - min(seconds)) / median,
        "mfu": tokens / median * flops_per_token / peak if peak else None,
        "peak_memory_bytes": memory() if jax.default_backend() != "cpu" else None}


def run_workload(name: str, workload: Workload, config, params, hf_dir: Path, suite: Suite,
                 gpt_bert_code: Path | None) -> dict:
    inputs = make_inputs(workload, config)
    tokens = tokens_of(inputs)
    mean_len = tokens / (len(inputs["rows"]) if "rows" in inputs else workload.batch)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops_per_token = flops.training_flops_per_token(config, n_params, round(mean_len))
    if workload.kind != "train":
        flops_per_token /= 3
    row = {"model": name, "workload": workload.kind, "shape": workload.shape,
           "dtype": suite.dtype, "tokens": tokens, "measurements": []}
    models = {}  # backend -> our forward model, whose logits the peers' are checked against

    def ours_fn(backend, all_positions=False):
        backend_config = dataclasses.replace(config, attention_backend=backend)
        if workload.kind == "train" and backend != "reference":  # they have no attention dropout
            backend_config = dataclasses.replace(backend_config,
                                                 **{config.ATTENTION_DROPOUT_FIELD: 0.0})
        if workload.kind == "train":
            batch = inputs if all_positions else inputs | {"masked_positions": masked_positions(
                inputs["labels"], max_predictions(workload.seq))}
            step, planned = ours.train_step(backend_config, params, batch)
            return step, lambda: planned
        model = models[backend] = PretrainedModel(backend_config, params)
        if workload.kind == "variable":
            return ours.bucketed(model, inputs["rows"], workload.batch), lambda: None
        return ours.forward(model, inputs), lambda: ours.forward_xla_bytes(model, inputs)

    for backend in suite.backends:
        label = backend if workload.kind != "train" or backend == "reference" else (
            f"{backend}, no attention dropout")
        row["measurements"].append(measure(f"bert_jax ({label})", "bert_jax",
                                           lambda: ours_fn(backend), suite, tokens,
                                           flops_per_token))
        if "error" in row["measurements"][-1]:
            models.pop(backend, None)
    if workload.kind == "train" and suite.backends:  # the head on every position, as HF's
        backend = suite.backends[0]
        row["measurements"].append(measure(f"bert_jax ({backend}, all positions)", "bert_jax",
                                           lambda: ours_fn(backend, all_positions=True), suite,
                                           tokens, flops_per_token))

    def peer_fn(implementation):
        model = peer.load(hf_dir, implementation, suite.dtype, train=workload.kind == "train",
                          gpt_bert_code=gpt_bert_code)
        if workload.kind == "train":
            return peer.train_step(model, inputs, suite.dtype), peer.peak_memory
        if workload.kind == "variable":
            return peer.padded_batches(model, inputs["rows"], workload.batch,
                                       config.pad_token_id), peer.peak_memory
        if models:  # same weights and inputs: the outputs agree
            ref = np.asarray(next(iter(models.values()))(**inputs).logits, np.float32)
            diff = float(np.abs(peer.logits(model, inputs) - ref).max())
            row.setdefault("max_abs_diff_logits", {})[implementation] = diff
        return peer.forward(model, inputs), peer.peak_memory

    for implementation in suite.peers:
        row["measurements"].append(measure(f"HF PyTorch ({implementation})", "peer",
                                           lambda: peer_fn(implementation), suite, tokens,
                                           flops_per_token))
    best = max((m["tokens_per_second"] for m in row["measurements"]
                if m["side"] == "peer" and "tokens_per_second" in m), default=None)
    for m in row["measurements"]:
        if best and "tokens_per_second" in m:
            m["x_best_peer"] = m["tokens_per_second"] / best
    return row


def run_model(name: str, suite: Suite, gpt_bert_code: Path | None = None) -> Iterator[dict]:
    """Every workload's row of `suite` on one model, bert_jax and its peers on the same
    weights, each as soon as it is measured."""
    config = preset(name, dtype=suite.dtype).with_head("ForMaskedLM")
    params = family_of_config(config).init_params(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        if suite.peers:
            PretrainedModel(config, params).save_pretrained(hf_dir)
        for workload in suite.workloads:
            workload = workload.capped(config.max_length[1])
            yield run_workload(name, workload, config, params, hf_dir, suite, gpt_bert_code)
            print(f"done: {name} {workload.kind} {workload.shape}", file=sys.stderr, flush=True)


def environment() -> dict:
    import torch
    import transformers

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "jax_device": device.device_kind, "jax_device_count": jax.device_count(),
                    "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else "cpu", "cpu_threads_torch": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def table(result: dict) -> str:
    env = result["machine"]
    lines = [f"# suite {result['suite']}: {env['jax_device']} (jax), {env['torch_device']} "
             f"(torch), {env['processor']}; {result['date']}",
             "; ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"`{result['command']}`", "",
             "| model | workload | shape | dtype | implementation | tokens/s | spread | "
             "x best peer | MFU | peak memory | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dtype_names = {"float32": "fp32", "bfloat16": "bf16"}
    for row in result["rows"]:
        for m in row["measurements"]:
            impl = m["implementation"].split("(")[-1].rstrip(")")
            note = m.get("error", "")
            if not note and impl in row.get("max_abs_diff_logits", {}):
                note = f"max abs logits diff {row['max_abs_diff_logits'][impl]:.1e}"
            ok = "tokens_per_second" in m
            lines.append("| " + " | ".join([
                row["model"], row["workload"], row["shape"], dtype_names[row["dtype"]],
                m["implementation"], f"{m['tokens_per_second']:,.0f}" if ok else "—",
                f"±{m['spread'] / 2:.0%}" if ok else "",
                f"{m['x_best_peer']:.2f}x" if "x_best_peer" in m else "",
                f"{m['mfu']:.1%}" if m.get("mfu") else "", _fmt_bytes(m.get("peak_memory_bytes")),
                note.replace("|", "/")]) + " |")
    return "\n".join(lines)


def run(suite_name: str, models=None, workloads=None, quick: bool = False, backends=None,
        peers=None, gpt_bert_code: Path | None = None, command: str = "",
        on_row: Callable[[dict], None] = lambda result: None) -> dict:
    """The suite's rows (every model x workload) with the machine, date and versions;
    `on_row(result)` sees the result so far after every row. `backends` / `peers` replace the
    suite's bert_jax attention backends / PyTorch implementations (the CPU suite leaves
    torch.compile out unless `peers` names it: it compiles slowly there)."""
    suite = SUITES[suite_name]
    if workloads:
        suite = dataclasses.replace(suite, workloads=tuple(
            w for w in suite.workloads if w.kind in workloads))
    if quick:
        suite = dataclasses.replace(suite, warmup=1, iters=2, workloads=tuple(
            dataclasses.replace(w, rows=2 * w.batch) if w.kind == "variable" else w
            for w in suite.workloads))
    for name in models or ():
        preset(name)  # an unknown name fails before anything runs
    if peers is None:
        peers = [p for p in suite.peers if p != "compile" or peer.device() == "cuda"]
    suite = dataclasses.replace(suite, backends=tuple(backends or suite.backends),
                                peers=tuple(peers))
    result = {"suite": suite_name, "command": command, **environment(),
              "settings": dataclasses.asdict(suite) | {"models": list(models or suite.models)},
              "rows": []}
    for name in models or suite.models:
        for row in run_model(name, suite, gpt_bert_code):
            result["rows"].append(row)
            on_row(result)
    return result


def write_json(result: dict, path: Path) -> None:
    """Replace `path` whole (written beside it, then renamed): never a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=sorted(SUITES))
    what.add_argument("--show", type=Path, metavar="OUT",
                      help="print the table of a result file (a finished or a stopped run)")
    parser.add_argument("--model", action="append", metavar="NAME",
                        help="a preset (repeatable); default: the suite's models")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="only these workloads (repeatable); default: all")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up and 2 timed calls, a smaller variable-length set")
    parser.add_argument("--backend", action="append", choices=ATTENTION_BACKENDS,
                        help="only these bert_jax attention backends (repeatable); default: "
                             "the suite's")
    parser.add_argument("--peer", action="append", choices=peer.IMPLEMENTATIONS,
                        help="only these PyTorch implementations (repeatable); default: the "
                             "suite's (on the CPU without compile, slow to compile there)")
    parser.add_argument("--gpt-bert-code", type=Path, metavar="DIR",
                        help="a local copy of NorBERT 4's modeling_gptbert.py and "
                             "configuration_gptbert.py: the PyTorch peer of GPT-BERT models")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)

    def save(partial: dict) -> None:
        if args.json:
            write_json(partial, args.json)

    try:
        if args.show:
            result = read_json(args.show)
            if not {"machine", "versions", "rows"} <= set(result):
                raise BertJaxError(f"{args.show}: not a result of python -m benchmarks.run")
        else:
            result = run(args.suite, args.model, args.workload, args.quick, args.backend,
                         args.peer, args.gpt_bert_code, command, on_row=save)
    except BertJaxError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
