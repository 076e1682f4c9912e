"""Ahead-of-time compile of a recipe's train step, for a TPU slice this machine need not have
(`bert-jax compile`, and `--compile-only` on `pretrain` / `finetune`).

`compile_recipe` builds what a run of the recipe would train with: the recipe's mesh over the
target's devices, the model config (dtype, remat, scan_layers as the recipe says, laid out for
that mesh as the trainers lay it out; an `init_from` checkpoint's config.json only), the
abstract train state (shapes, dtypes and shardings only: nothing is allocated), the abstract
global batch the recipe's data pipeline feeds the step (its keys, shapes and dtypes, taken
from the pipeline's own layout, `data.pipeline.*_batch_spec` and `data.batching`, without
reading any data) and the run's jitted train step (DP-SGD's when the recipe has a `dp`
section), then lowers and compiles that step. The target is a TPU topology such as `v5e:4x4`
(libtpu compiles for it without the chips: `jax.experimental.topologies`), or this machine's
own devices.

The `CompileReport` says, per chip, what the compiled program holds (arguments, temporaries,
outputs and what they alias) against the chip's HBM, whether it fits, the step's FLOPs
(XLA's count of the partitioned program, and the model FLOPs the training logs' MFU uses),
the XLA cost model's step time and the MFU it implies (an estimate, not a measurement), and
the collectives of the partitioned program. A compile that runs out of HBM is a report too,
with the compiler's message.

What a recipe leaves to data or checkpoints that are not here is assumed and listed in the
report's `notes`: a pretraining vocabulary without `--tokenizer` is the preset's; a fine-tuning
head has `data.labels`' label count, or the checkpoint's, or 2; a fine-tuning batch is at the
longest bucket (`data.max_seq_length`, the largest program of the run); a DP-SGD batch has the
rows of the plan for a dataset of `DP_DATASET_ROWS` x the batch size.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import yaml

from bert_jax import sharding
from bert_jax.convert import hf_dir
from bert_jax.data.batching import Features, pad_rows
from bert_jax.data.multiple_choice import ChoiceFeatures, choice_batch
from bert_jax.data.packing import packed_rows
from bert_jax.data.pipeline import bert_batch_spec, gpt_bert_batch_spec
from bert_jax.data.private_batches import PrivateBatches, mlm_rows, task_rows
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.files import is_remote
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.modeling.presets import PRESETS, preset
from bert_jax.pretrained import load_config, resolve
from bert_jax.training import flops
from bert_jax.training.finetune import FinetuneRecipe, _model_inputs
from bert_jax.training.objectives import pretraining_head, special_token_ids
from bert_jax.training.recipe import Recipe, load_recipe
from bert_jax.training.run import abstract_state, checked_mesh, mesh_layout, train_step
from bert_jax.training.tasks import (
    MultipleChoiceTask,
    Prepared,
    QuestionAnsweringTask,
    span_positions,
)

GIB = 2**30
# A DP-SGD plan's rows depend on the dataset's size (the Poisson sample's tail); without the
# data, the plan is for this many times the batch size (a 1% sampling rate).
DP_DATASET_ROWS = 100
DEFAULT_NUM_LABELS = 2
HOST_ONLY = ("example_id",)  # what `loop.global_batch` keeps on the host
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    megacore: bool  # one JAX device per chip of two TensorCores (v4, v5p)


# HBM per chip, from Cloud TPU's documentation; the bf16 peaks are `flops.PEAK_FLOPS`'.
CHIPS = {"v4": Chip("v4", 32 * GIB, True), "v5e": Chip("v5e", 16 * GIB, False),
         "v5p": Chip("v5p", 95 * GIB, True), "v6e": Chip("v6e", 32 * GIB, False)}
_TOPOLOGY = re.compile(r"(?P<chip>[a-z0-9]+):(?P<shape>\d+(?:x\d+){1,2})")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip of the compiled program (XLA's memory analysis)."""

    arguments: int
    temporaries: int
    outputs: int
    aliased: int  # outputs that reuse argument buffers (the donated train state)
    code: int

    @property
    def total(self) -> int:
        """What the step holds at once: arguments, outputs not aliased to them, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    count: int  # instructions of the partitioned program (a loop body's once)
    bytes: int  # their results' bytes per chip


@dataclasses.dataclass(frozen=True)
class CompileReport:
    recipe: str
    kind: str  # "pretraining" | "fine-tuning"
    target: str  # a topology, or "local"
    device_kind: str
    chips: int
    mesh: dict[str, int]
    model: str
    params: int
    batch: dict[str, str]  # the global batch: name -> dtype[shape]
    step: str
    compile_seconds: float
    memory: Memory | None  # None when the compile ran out of memory
    hbm_bytes: int | None  # per chip; None when unknown (CPUs, GPUs)
    fits: bool | None
    flops_per_chip: float | None  # XLA's count for the partitioned program, remat included
    model_flops: float  # per step, all chips: 6N + attention (flops.py, what MFU is logged on)
    optimal_seconds: float | None  # what the XLA cost model says of the step's time
    peak_flops: float | None
    collectives: tuple[Collective, ...]
    # while loops of the compiled program (scanned layers, micro-batches, DP-SGD chunks, the
    # partitioner's windowed matmuls): XLA's FLOP count takes each loop body once, whatever its
    # trip count, so `flops_per_chip` is then less than the step computes
    loops: int
    notes: tuple[str, ...]
    error: str | None = None  # the compiler's message when it ran out of memory

    @property
    def step_seconds(self) -> float | None:
        """The cost model's step time, where it gave one (some programs get a value <= 0)."""
        return self.optimal_seconds if self.optimal_seconds and self.optimal_seconds > 0 else None

    @property
    def mfu(self) -> float | None:
        """The MFU the cost model's step time implies (model FLOPs over the chips' peak)."""
        if self.step_seconds is None or not self.peak_flops:
            return None
        return self.model_flops / (self.step_seconds * self.chips * self.peak_flops)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "step_seconds": self.step_seconds, "mfu": self.mfu,
                "memory": None if self.memory is None else {
                    **dataclasses.asdict(self.memory), "total": self.memory.total}}

    def format(self) -> str:
        """The report as a table for a terminal."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"{self.recipe or 'recipe'} ({self.kind}) compiled for {self.target}: "
                 f"{self.chips} x {self.device_kind}, mesh {mesh}, in {self.compile_seconds:.1f} s",
                 f"  model      {self.model}, {self.params:,} params",
                 f"  step       {self.step}",
                 "  batch      " + ", ".join(f"{k} {v}" for k, v in self.batch.items()),
                 "", "per chip" if self.target != "local" else "per device"]
        hbm = "" if self.hbm_bytes is None else f" of {_size(self.hbm_bytes)} HBM"
        if self.memory is not None:
            m = self.memory
            share = "" if self.hbm_bytes is None else f" ({100 * m.total / self.hbm_bytes:.1f}%)"
            lines += [f"  arguments    {_size(m.arguments):>12}",
                      f"  temporaries  {_size(m.temporaries):>12}",
                      f"  outputs      {_size(m.outputs):>12}   ({_size(m.aliased)} of them "
                      f"aliased to arguments)",
                      f"  total        {_size(m.total):>12}{hbm}{share}"]
        verdict = {True: "FITS", False: "DOES NOT FIT", None: "no HBM size known here"}[self.fits]
        lines.append(f"  verdict      {verdict}")
        if self.error:
            lines += ["", "compiler: " + self.error]
        if self.flops_per_chip is not None:
            lines += ["", "FLOPs per step",
                      f"  compiled program  {self.flops_per_chip * self.chips:.3e} "
                      f"({self.flops_per_chip:.3e} per chip; rematerialised work included)",
                      f"  model             {self.model_flops:.3e} (6N + attention, as MFU "
                      "is logged)"]
            if self.loops:
                lines.append(f"  the compiled count takes each of the program's {self.loops} "
                             "loop bodies once (scanned layers, micro-batches, DP-SGD chunks, "
                             "windowed matmuls): less than the step computes")
        if self.step_seconds is not None:
            mfu = "" if self.mfu is None else f", MFU {100 * self.mfu:.1f}%"
            lines += ["", f"step time    {self.step_seconds * 1e3:.2f} ms{mfu} "
                      "-- estimate (XLA cost model), not a measurement"]
        elif self.memory is not None:
            said = ("" if self.optimal_seconds is None
                    else f" (its optimal_seconds: {self.optimal_seconds:.3g})")
            lines += ["", f"step time    the XLA cost model gave no estimate{said}"]
        if self.collectives:
            lines += ["", "collectives (partitioned HLO, per chip; a loop body counts once)"]
            lines += [f"  {c.kind:<20}{c.count:>6} ops {_size(c.bytes):>12}"
                      for c in self.collectives]
        if self.notes:
            lines += ["", "assumed"] + [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


def load_any_recipe(path: str, overrides: list[str] = ()):
    """A pretraining or fine-tuning recipe, told apart by `data.task` (fine-tuning's)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BertJaxError(f"{path}: cannot read the recipe ({err})") from None
    data = raw.get("data") if isinstance(raw, dict) else None
    tasked = (isinstance(data, dict) and "task" in data) or any(
        item.startswith("data.task=") for item in overrides)
    if tasked:
        return load_recipe(path, overrides, FinetuneRecipe)
    try:
        return load_recipe(path, overrides, Recipe)
    except BertJaxError as pretraining_error:
        try:
            return load_recipe(path, overrides, FinetuneRecipe)
        except BertJaxError:
            raise pretraining_error from None


def compile_recipe(recipe, *, topology: str | None = None, tokenizer_dir: str | None = None,
                   model: str | None = None, name: str = "") -> CompileReport:
    """Compile the train step of `recipe` (a pretraining `Recipe` or a `FinetuneRecipe`) for
    `topology` (e.g. "v5e:4x4"; None: this machine's devices) and report on it.

    `tokenizer_dir` gives a pretraining recipe's vocabulary; `model` (a preset name or a
    model directory) stands for the recipe's `init_from` checkpoint when it is not here.
    """
    chip = None if topology is None else _chip(topology)
    devices = jax.devices() if topology is None else topology_devices(topology)
    target = topology or "local"
    finetuning = isinstance(recipe, FinetuneRecipe)
    notes: list[str] = []
    t = recipe.train
    if finetuning:
        batch_size, eval_batches = t.batch_size, (t.eval_batch_size or t.batch_size,)
        steps = t.steps or 1000
        if t.steps is None:
            notes.append("the schedule's length (train.epochs of data not read): 1000 steps; "
                         "it changes no shape")
    else:
        batch_size, eval_batches, steps = recipe.data.global_batch_size, (), t.steps
    optimizer_config = recipe.optimizer.optimizer_config(steps)
    try:
        mesh = checked_mesh(recipe.mesh, batch_size, *eval_batches,
                            accumulation_steps=optimizer_config.accumulation_steps,
                            devices=devices)
    except BertJaxError as err:
        where = (f"this machine has {len(devices)} devices" if topology is None
                 else f"topology {topology} has {len(devices)} chips")
        raise BertJaxError(f"{where}: {err}") from None
    runtime = {**recipe.model.runtime(), **mesh_layout(recipe.mesh, mesh)}  # as the trainers
    config = (_finetune_config(recipe, runtime, model, notes) if finetuning
              else _pretrain_config(recipe, runtime, tokenizer_dir, model, notes))
    plan = None
    if recipe.dp is not None:
        plan = recipe.dp.plan(DP_DATASET_ROWS * batch_size, batch_size, steps,
                              multiple_of=sharding.batch_split(mesh))
        notes.append(f"DP-SGD: {plan.rows} rows a step, the plan for a dataset of "
                     f"{plan.dataset_size:,} examples")
    spec = batch_spec(recipe, config, plan, notes)
    optimizer, step = train_step(config, optimizer_config, mesh, plan)
    state = abstract_state(config, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh, 1)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
             for k, (shape, dtype) in spec.items() if k not in HOST_ONLY}
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    tokens = math.prod(batch["input_ids"].shape)
    model_flops = tokens * flops.training_flops_per_token(config, params,
                                                          batch["input_ids"].shape[-1])
    start = time.perf_counter()
    error = compiled = None
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            if not _out_of_memory(str(err)):
                raise
            error = str(err).strip()
    seconds = time.perf_counter() - start
    memory = None if compiled is None else _memory(compiled)
    hbm = None if chip is None else chip.hbm_bytes
    fits = False if error else (None if hbm is None or memory is None
                                else memory.total <= hbm)
    cost = {} if compiled is None else _cost(compiled)
    hlo = "" if compiled is None else compiled.as_text()
    return CompileReport(
        recipe=name, kind="fine-tuning" if finetuning else "pretraining", target=target,
        device_kind=devices[0].device_kind, chips=len(devices),
        mesh={k: int(v) for k, v in mesh.shape.items()},
        model=(f"{config.architecture}, {config.dtype}, remat {config.remat}, "
               f"scan_layers {str(config.scan_layers).lower()}"),
        params=params,
        batch={k: f"{np.dtype(v.dtype).name}[{','.join(map(str, v.shape))}]"
               for k, v in batch.items()},
        step=("DP-SGD train step" if plan is not None else "train step") + (
            f", {optimizer_config.accumulation_steps} micro-batches"
            if optimizer_config.accumulation_steps > 1 else ""),
        compile_seconds=seconds, memory=memory, hbm_bytes=hbm, fits=fits,
        flops_per_chip=cost.get("flops"), model_flops=model_flops,
        optimal_seconds=cost.get("optimal_seconds"),
        peak_flops=flops.peak_flops(devices[0]),
        collectives=collectives(hlo), loops=len(re.findall(r" while\(", hlo)),
        notes=tuple(notes), error=error)


def topology_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice, e.g. "v5e:4x4" (16 chips), "v4:2x2x4": libtpu
    describes the slice without its chips (as MaxText's train_compile.py does)."""
    chip = _chip(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise BertJaxError(f"--topology {topology}: compiling for a TPU needs libtpu, which is "
                           "not installed (pip install -e \".[tpu]\")")
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                 **options).devices)
    except jax.errors.JaxRuntimeError as err:
        raise BertJaxError(f"--topology {topology}: libtpu refused it "
                           f"({str(err).strip().splitlines()[0]})") from None


def _chip(topology: str) -> Chip:
    match = _TOPOLOGY.fullmatch(topology)
    if match is None or match["chip"] not in CHIPS:
        raise BertJaxError(f"unknown topology {topology!r}: expected CHIP:AxB or CHIP:AxBxC with "
                           f"CHIP one of {', '.join(CHIPS)} (e.g. v5e:4x4, v4:2x2x4)")
    return CHIPS[match["chip"]]


def _pretrain_config(recipe, runtime: dict, tokenizer_dir, model, notes):
    """The pretraining model, as `pretrain.build_model` makes it (its head included)."""
    m = recipe.model
    if model is not None:
        config = _named_model(model, runtime, m.overrides)
        notes.append(f"the model is --model {model} (the recipe's own: "
                     f"{m.init_from or m.preset})")
    elif (m.preset is None) == (m.init_from is None):
        raise BertJaxError("recipe model: give exactly one of preset or init_from")
    elif m.init_from is not None:
        config = _checkpoint_config(m.init_from, runtime)
    elif tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        tokens = {"vocab_size": tokenizer.backend.get_vocab_size(),
                  **special_token_ids(preset(m.preset), tokenizer)}
        config = preset(m.preset, **runtime, **{**tokens, **m.overrides})
    else:
        config = preset(m.preset, **runtime, **m.overrides)
        notes.append(f"vocab_size {config.vocab_size:,}: the preset's (--tokenizer gives the "
                     "run's)")
    return config.with_head(pretraining_head(config, recipe.data.nsp))


def _finetune_config(recipe, runtime: dict, model, notes):
    """The fine-tuning model with the task's head, as `finetune.task_model` makes it."""
    m, task = recipe.model, recipe.data
    if model is not None:
        saved = _named_model(model, runtime, {})
        notes.append(f"the model is --model {model} (the recipe's own: {m.init_from})")
    elif not m.init_from:
        raise BertJaxError("model.init_from: required (the checkpoint to fine-tune)")
    else:
        saved = _checkpoint_config(m.init_from, runtime)
    labels = getattr(task, "labels", None)
    problem_type = getattr(task, "problem_type", None)
    if isinstance(task, QuestionAnsweringTask):
        num_labels = 2
    elif isinstance(task, MultipleChoiceTask):
        num_labels = None
    elif problem_type == "regression":
        num_labels = 1
    elif labels:
        num_labels = len(labels)
    elif saved.head == task.HEAD:
        num_labels = saved.num_labels
    else:
        num_labels = DEFAULT_NUM_LABELS
        notes.append(f"{num_labels} labels (data.labels not given, the data not read)")
    if hasattr(task, "problem_type") and problem_type is None:
        problem_type = ("multi_label_classification" if isinstance(task.label_column, list)
                        else "single_label_classification")
        notes.append(f"problem_type {problem_type} (data.problem_type not given)")
    config = dataclasses.replace(saved.with_head(task.HEAD, num_labels),
                                 problem_type=problem_type)
    field, limit = config.max_length
    if task.max_seq_length > limit:
        raise BertJaxError(f"data.max_seq_length={task.max_seq_length} is more than the "
                           f"model's {field}={limit}")
    return config


def _named_model(model: str, runtime: dict, overrides: dict):
    """`--model`: a preset name, or a model directory's config."""
    if model in PRESETS:
        return preset(model, **runtime, **overrides)
    return _checkpoint_config(model, runtime)


def _checkpoint_config(source: str, runtime: dict):
    """The config of a local, gs:// or Hub checkpoint; from the Hub, config.json alone is
    fetched."""
    path = Path(source)
    if not is_remote(source) and not path.exists() and source.count("/") == 1 \
            and not source.startswith((".", "/")):
        try:
            from huggingface_hub import hf_hub_download

            return hf_dir.load_config(Path(hf_hub_download(source, "config.json")).parent,
                                      **runtime)
        except Exception as err:  # offline, unknown repo, gated, ...
            raise BertJaxError(f"{source}: not a local directory, and its config.json could not "
                               f"be fetched from the Hub ({type(err).__name__}; `bert-jax "
                               "compile --model PRESET_OR_DIR` compiles for the model it "
                               "holds)") from None
    if not is_remote(source) and not path.exists():
        raise BertJaxError(f"{source}: no such model directory (`bert-jax compile --model "
                           "PRESET_OR_DIR` compiles for the model it will hold)")
    return load_config(resolve(source), **runtime)


def batch_spec(recipe, config, plan=None, notes: list[str] | None = None) -> dict:
    """{name: (shape, dtype)} of the global batch the recipe's data feeds its train step
    (`plan`: DP-SGD's), from the data pipelines' own layout, without reading any data;
    what the batch's layout depends on in the data is assumed and added to `notes`."""
    if isinstance(recipe, FinetuneRecipe):
        return _finetune_batch(recipe, config, plan, [] if notes is None else notes)
    return _pretrain_batch(recipe, config, plan)


def _pretrain_batch(recipe, config, plan):
    """{name: (shape, dtype)} of the global batch the pretraining pipeline feeds the step."""
    d = recipe.data
    if plan is not None:  # every example [CLS] [SEP]
        if isinstance(config, GptBertConfig) or d.nsp:  # as `objectives.private_pipeline`
            raise BertJaxError("dp: DP-SGD pretraining is masked LM on BERT / Megatron models "
                               "(set data.nsp=false)")
        examples = [np.array([1, 2], np.int32)] * plan.dataset_size
        rows = mlm_rows(examples, seed=0, max_seq_length=d.max_seq_length,
                        vocab_size=config.vocab_size, pad_id=0, mask_id=3, special_ids=(0, 1, 2),
                        mlm_probability=d.mlm_probability)
        return _layout(next(PrivateBatches(plan, rows, seed=0)))
    if isinstance(config, GptBertConfig):
        return gpt_bert_batch_spec(d.global_batch_size, d.max_seq_length)
    return bert_batch_spec(d.global_batch_size, d.max_seq_length, nsp=d.nsp,
                           max_predictions_per_seq=d.max_predictions_per_seq)


def _finetune_batch(recipe, config, plan, notes):
    """{name: (shape, dtype)} of the global batch the fine-tuning data feeds the step: the
    trainer's own batch functions on examples of no tokens, at the longest bucket."""
    task, length, rows = recipe.data, recipe.data.max_seq_length, recipe.train.batch_size
    features = _examples(config, 1 if plan is None else plan.dataset_size)

    def model_batch(batch: dict, split: str) -> dict:  # the task's, as `Prepared.model_batch`
        if isinstance(task, QuestionAnsweringTask):
            return span_positions(batch, split)
        if isinstance(task, MultipleChoiceTask):
            choices = _examples(config, len(features) * len(task.ending_columns))
            return choice_batch(batch, ChoiceFeatures(features, choices), 0)
        return batch

    inputs = _model_inputs(config, Prepared(features, None, None, None, (), lambda _: {},
                                            model_batch=model_batch))
    if plan is not None:
        batch = next(PrivateBatches(plan, task_rows(features, length=length, pad_id=0), seed=0))
    elif getattr(task, "pack", False):
        segments = max(1, length // 16)
        notes.append(f"data.pack: up to {segments} examples a row (the data decides)")
        batch = packed_rows(features, [[]] * rows, length, 0, segments)
    else:
        batch = pad_rows(features, np.full(rows, -1), length, 0)
    return _layout(inputs(batch, "train"))


def _examples(config, count: int) -> Features:
    """`count` one-token examples with their labels, laid out as the task's data is."""
    tokens = [np.zeros(1, np.int32)] * count
    if config.head == "ForTokenClassification":
        labels = [np.zeros(1, np.int32)] * count
    elif config.head == "ForQuestionAnswering":
        labels = np.zeros((count, 2), np.int32)
    elif getattr(config, "problem_type", None) == "regression":
        labels = np.zeros(count, np.float32)
    elif getattr(config, "problem_type", None) == "multi_label_classification":
        labels = np.zeros((count, config.num_labels), np.float32)
    else:
        labels = np.zeros(count, np.int32)
    return Features(tokens, tokens, labels)


def _layout(batch: dict) -> dict:
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


def _out_of_memory(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def _memory(compiled) -> Memory | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return Memory(arguments=stats.argument_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                  outputs=stats.output_size_in_bytes, aliased=stats.alias_size_in_bytes,
                  code=stats.generated_code_size_in_bytes)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>\S+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<op>[a-z][a-z0-9-]*)\(")
_CALLS = re.compile(r"calls=%(?P<name>[\w.-]+)")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9a-z]*)\[(?P<dims>[0-9,]*)\]")


def collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Counts and result bytes, per chip, of the collectives of a partitioned HLO module
    (`compiled.as_text()`). The TPU compiler's reduce-scatter is a fusion that calls an
    `all-reduce-scatter` computation: it counts as a reduce-scatter (the all-reduce inside
    it not again); an async `*-start` counts once, by its output."""
    scatters = set(re.findall(r"calls=%(all-reduce-scatter[\w.-]*)", hlo_text))
    count: dict[str, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None:
            computation = header["name"]
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction is None:
            continue
        op, arrays = instruction["op"], _arrays(instruction["shape"])
        calls = _CALLS.search(line)
        if op == "fusion" and calls is not None and calls["name"] in scatters:
            kind = "reduce-scatter"
        else:
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done") or computation in scatters:
                continue
            if op.endswith("-start") and kind != "all-reduce":  # (inputs, outputs, contexts)
                arrays = [a for a in arrays if a[1] or a[0] not in ("u32", "s32")]
                arrays = arrays[len(arrays) // 2:]
        count[kind] += 1
        size[kind] += sum(_bytes(dtype, dims) for dtype, dims in arrays)
    return tuple(Collective(kind, count[kind], size[kind]) for kind in COLLECTIVES
                 if count[kind])


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
            for m in _ARRAY.finditer(shape)]


def _bytes(dtype: str, dims: tuple[int, ...]) -> int:
    bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype)[0])
    return math.ceil(math.prod(dims) * bits / 8)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
