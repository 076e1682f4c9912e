"""Fine-tuning behind `bert-jax finetune`: a pretrained encoder, a task head, a task's data.

The recipe (`FinetuneRecipe`, YAML + `--set`) names the checkpoint (`model.init_from`: an HF
or bert_jax Orbax directory, or a Hub id), the task and its data (`data.task`, see `tasks`),
the optimizer (AdamW; the schedule's length follows from `train.epochs` or `train.steps`,
warmup from `warmup_ratio`, as transformers' Trainer), the mesh and the run. Training runs in
the run pretraining uses (`run.TrainingRun` around `loop.train_loop`), on the same sharded
train state and step; the recipe's sections extend pretraining's shared ones with the task's.
Train batches are padded to buckets (`data.batching`) or, with `data.pack` (classification
and token classification), packed rows (`data.packing`: `train.batch_size` counts rows, an
epoch is all of them, the packing efficiency is logged at step 0 and returned); evaluation is
always one example a row, so its metrics are per example as without packing.

Every `train.eval_every` steps and at the end the eval split is scored (`eval_loss` and the
task's metrics, padding rows left out); the best model by `train.best_metric` (default: the
task's headline metric) is kept in `output_dir/best`, and a finished run copies it to
`output_dir/hf` (the last model when there is no eval split): an HF directory with
`id2label` / `label2id` / `problem_type` and the tokenizer, which transformers loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from pathlib import Path

import jax
import numpy as np
from etils import epath

from bert_jax import sharding
from bert_jax.convert import hf_dir, mapping
from bert_jax.convert.families import family_of_config
from bert_jax.data.batching import batches, bucket_lengths
from bert_jax.data.packing import efficiency, pack, packed_batches
from bert_jax.data.private_batches import PrivateBatches, task_rows
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, copy_tree
from bert_jax.pretrained import from_pretrained, hf_tensors, load_config, placed, resolve
from bert_jax.sharding import MeshConfig
from bert_jax.training.loop import global_batch
from bert_jax.training.optimizer import OptimizerConfig, OptimizerSettings
from bert_jax.training.privacy import DpConfig
from bert_jax.training.recipe import ModelSection, TrainSection
from bert_jax.training.run import (
    TrainingRun,
    checked_mesh,
    mesh_layout,
    save_model,
    use_compilation_cache,
)
from bert_jax.training.tasks import ClassificationTask, Outputs, Prepared, TaskSection

logger = logging.getLogger("bert_jax")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class FinetuneModel(ModelSection):
    init_from: str = ""  # an HF or bert_jax Orbax directory, or a Hub model id
    tokenizer: str | None = None  # a directory with the tokenizer; default: init_from
    # A checkpoint head whose shapes do not fit the task (e.g. another number of labels) is an
    # error, or with this set, re-initialised with a warning (transformers' option of the name).
    ignore_mismatched_sizes: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneOptimizer(OptimizerSettings):
    """The shared settings with fine-tuning's defaults; the schedule's length follows from
    the run's (`optimizer_config`)."""

    learning_rate: float = 2e-5
    clip_norm: float | None = 1.0
    warmup_ratio: float = 0.1  # of the optimizer updates, rounded up (transformers')
    warmup_steps: int | None = None  # instead of warmup_ratio

    def optimizer_config(self, steps: int) -> OptimizerConfig:
        warmup = (self.warmup_steps if self.warmup_steps is not None
                  else math.ceil(self.warmup_ratio * steps))
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerSettings)}
        return OptimizerConfig(**shared, warmup_steps=warmup, total_steps=steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneTrain(TrainSection):
    output_dir: str = "runs/finetune"
    seed: int = 42
    keep_checkpoints: int = 1  # training checkpoints, for --resume (the best is kept apart)
    epochs: float = 3.0
    steps: int | None = None  # instead of epochs
    batch_size: int = 32  # global, in examples
    eval_batch_size: int | None = None  # default: batch_size
    eval_every: int | None = None  # in steps; default: once an epoch
    save_every: int | None = None  # default: eval_every
    best_metric: str | None = None  # an eval metric, e.g. f1; default: the task's headline


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    model: FinetuneModel = FinetuneModel()
    data: TaskSection = ClassificationTask()
    optimizer: FinetuneOptimizer = FinetuneOptimizer()
    mesh: MeshConfig = MeshConfig()
    train: FinetuneTrain = FinetuneTrain()
    dp: DpConfig | None = None  # DP-SGD fine-tuning: see training/privacy.py


def finetune(recipe: FinetuneRecipe, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune as `recipe` says; returns the last logged metrics and the best evaluation."""
    t, task = recipe.train, recipe.data
    out = epath.Path(t.output_dir)  # local or gs://
    use_compilation_cache(t.compilation_cache_dir)
    eval_batch_size = t.eval_batch_size or t.batch_size
    mesh = checked_mesh(recipe.mesh, t.batch_size, eval_batch_size,
                        accumulation_steps=recipe.optimizer.accumulation_steps)
    tokenizer_dir, tokenizer, prepared, config, init_params = load_task(recipe, mesh)
    rows, packing = _packed(task, prepared, recipe.dp)
    steps, steps_per_epoch = run_length(t, len(prepared.train) if rows is None else len(rows),
                                        "examples" if rows is None else "packed rows")
    eval_every = t.eval_every or steps_per_epoch
    optimizer_config = recipe.optimizer.optimizer_config(steps)
    best = _Best(_best_metric(t.best_metric, prepared),
                 lambda params: save_model(config, params, tokenizer_dir, out / "best"))
    rows_of = dict(pad_id=tokenizer.pad_token_id, process_index=jax.process_index(),
                   process_count=jax.process_count())
    batching = dict(buckets=bucket_lengths(task.max_seq_length), **rows_of)
    if recipe.dp is None:
        train = dict(batch_size=t.batch_size, seed=t.seed, num_epochs=None, drop_remainder=True)
        data = (batches(prepared.train, **train, **batching) if rows is None else
                packed_batches(prepared.train, rows, max_length=task.max_seq_length, **train,
                               **rows_of))
        plan = None
    else:  # each step's examples drawn by the privacy plan, padded to one length
        plan = recipe.dp.plan(len(prepared.train), t.batch_size, steps,
                              multiple_of=sharding.batch_split(mesh))
        data = PrivateBatches(plan, task_rows(prepared.train, length=task.max_seq_length,
                                              pad_id=tokenizer.pad_token_id),
                              seed=t.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
    inputs = _model_inputs(config, prepared)
    outputs_step = make_outputs_step(config, mesh, prepared.outputs)
    with TrainingRun(recipe, config=config, params=init_params, tokenizer_dir=tokenizer_dir,
                     mesh=mesh, optimizer_config=optimizer_config, plan=plan,
                     records={"data": data, "best": best}, resume=resume) as run:

        def evaluate(state) -> dict:
            eval_batches = batches(prepared.eval, batch_size=eval_batch_size, **batching)
            outputs = eval_outputs(outputs_step, state.params, eval_batches, inputs,
                                   prepared.outputs, len(prepared.eval), run.batch_sharding)
            metrics = {f"eval_{k}": v for k, v in prepared.score(outputs).items()}
            best.update(int(state.step), metrics, state.params)
            return metrics

        if packing and not run.resumed:
            run.log.write({"step": 0, **packing})
        metrics, preempted = run.train(
            (inputs(batch, "train") for batch in data), steps=steps, eval_every=eval_every,
            save_every=t.save_every or eval_every,
            evaluate=None if prepared.eval is None else evaluate, progress=progress,
            desc=f"finetune {task.task}")
        metrics = {**metrics, **packing}
        if not preempted and best.step is not None:
            metrics = {**metrics, "best_step": best.step, f"best_{best.metric}": best.value}
            run.log.write({"step": steps, "best_step": best.step, "best_metric": best.value})
    if not preempted:
        if prepared.eval is None:
            save_model(config, run.state.params, tokenizer_dir, out / "hf")
        elif jax.process_index() == 0:
            with atomic_directory(out / "hf") as staging:
                copy_tree(out / "best", staging)
    return metrics


def load_task(recipe: FinetuneRecipe, mesh):
    """(tokenizer dir, tokenizer, prepared data, config, params) of the recipe's checkpoint
    fitted to its task and laid out for `mesh`, the params placed there."""
    model = recipe.model
    if not model.init_from:
        raise BertJaxError("model.init_from: required (the checkpoint to fine-tune)")
    model_dir = resolve(model.init_from)
    runtime = {**model.runtime(), **mesh_layout(recipe.mesh, mesh)}
    saved = load_config(model_dir, **runtime)
    tokenizer_dir = Path(model.tokenizer or model_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    prepared = _with_checkpoint_labels(recipe.data, saved).prepare(tokenizer)
    if prepared.train is None:
        raise BertJaxError("data.train: required (the examples to fine-tune on)")
    config, params = task_model(model_dir, saved, recipe.data.HEAD, prepared, model,
                                recipe.train.seed, mesh, runtime)
    field, limit = config.max_length
    if recipe.data.max_seq_length > limit:
        raise BertJaxError(f"data.max_seq_length={recipe.data.max_seq_length} is more than the "
                           f"model's {field}={limit}")
    tokens = tokenizer.backend.get_vocab_size()
    if tokens > config.vocab_size:  # JAX would clamp the ids it has no embedding for
        raise BertJaxError(f"{tokenizer_dir}: the tokenizer has {tokens} tokens, more than the "
                           f"model's vocab_size={config.vocab_size}")
    return tokenizer_dir, tokenizer, prepared, config, params


def task_model(model_dir: Path, saved, head: str, prepared: Prepared, model: FinetuneModel,
               seed: int, mesh=None, runtime: dict | None = None):
    """(config, params) of the checkpoint in `model_dir` (whose config is `saved`, read with
    `runtime`) with the task's head and labels, the params placed on `mesh`. Head weights the
    checkpoint lacks
    are initialised (with a warning); ones of another shape are an error, or with
    `model.ignore_mismatched_sizes` initialised too (as transformers does)."""
    num_labels = prepared.num_labels or (len(prepared.labels) if prepared.labels else None)
    config = saved.with_head(head, num_labels)
    config = dataclasses.replace(config, labels=prepared.labels or config.labels,
                                 problem_type=prepared.problem_type)
    if config.head == saved.head and config.num_labels == saved.num_labels:
        return config, from_pretrained(model_dir, mesh=mesh, **(runtime or {})).params
    state_dict, _ = hf_tensors(model_dir, saved)
    shapes = hf_dir.param_shapes(config)
    mismatched = {}
    for rule in family_of_config(config).mapping.rules(config):
        expected = mapping.hf_shape(rule, shapes[rule.path])
        if rule.hf_key in state_dict and state_dict[rule.hf_key].shape != expected:
            mismatched[rule.hf_key] = (state_dict.pop(rule.hf_key).shape, expected)
    if mismatched:
        key, (found, expected) = next(iter(mismatched.items()))
        if not model.ignore_mismatched_sizes:
            raise BertJaxError(
                f"{model.init_from}: its {saved.architecture} head does not fit this task's "
                f"{config.architecture} with {config.num_labels} outputs ({key} has shape "
                f"{found} there, {expected} here); set model.ignore_mismatched_sizes=true to "
                "initialise the head afresh")
        logger.warning("Some weights of %s were not initialized from %s because the shapes did "
                       "not match, and are newly initialized: %s", config.architecture,
                       model.init_from, ", ".join(f"{k}: {a} in the checkpoint, {b} here"
                                                  for k, (a, b) in mismatched.items()))
    return config, placed(config, hf_dir.params_from_hf(config, state_dict, model.init_from, seed,
                                                        on_device=mesh is None), mesh)


def run_length(train: FinetuneTrain, num_examples: int,
               unit: str = "examples") -> tuple[int, int]:
    """(steps, steps per epoch): whole batches only, every step the same shape."""
    per_epoch = num_examples // train.batch_size
    if per_epoch == 0:
        raise BertJaxError(f"data.train: {num_examples} {unit}, fewer than one batch "
                           f"(train.batch_size={train.batch_size})")
    steps = train.steps if train.steps is not None else math.ceil(train.epochs * per_epoch)
    if steps < 1:
        raise BertJaxError("train.steps / train.epochs: the run must have at least one step")
    return steps, per_epoch


def make_outputs_step(config, mesh, names: tuple[str, ...]):
    """outputs(params, batch) -> the model outputs `names` and the batch's example_id, whole
    on every device (then readable on every process)."""
    family = family_of_config(config)
    module = family.build_module(config)
    params_sharding = family.param_shardings(config, mesh)

    def outputs(params, batch):
        out = module.apply({"params": params}, **{k: v for k, v in batch.items()
                                                  if k in MODEL_INPUTS})
        return {"example_id": batch["example_id"], **{name: getattr(out, name) for name in names}}

    return jax.jit(outputs, in_shardings=(params_sharding, sharding.batch_sharding(mesh, 1)),
                   out_shardings=sharding.replicated(mesh))


def eval_outputs(outputs_step, params, eval_batches, inputs, names: tuple[str, ...],
                 num_examples: int, batch_sharding) -> Outputs:
    """Each eval example's outputs (its row of the padded batch), padding rows dropped."""
    rows: Outputs = {name: [None] * num_examples for name in names}
    for batch in eval_batches:
        batch = inputs(batch, "eval")
        batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS} | {
            "example_id": batch["example_id"].astype(np.int32)}
        out = jax.device_get(outputs_step(params, global_batch(batch, batch_sharding,
                                                               host_only=())))
        for name in names:
            for index, row in zip(out["example_id"], out[name]):
                if index >= 0:
                    rows[name][index] = row
    return rows


def _packed(task, prepared: Prepared, dp: DpConfig | None):
    """(the train examples packed into rows, {"packing_efficiency": real tokens / slots}) with
    `data.pack`; else (None, {}): the examples are padded by batch."""
    if not getattr(task, "pack", False):
        return None, {}
    if dp is not None:
        raise BertJaxError("data.pack: DP-SGD draws single examples, not packed rows; set "
                           "data.pack=false to fine-tune with dp")
    lengths = [len(ids) for ids in prepared.train.input_ids]
    rows = pack(lengths, task.max_seq_length)
    real = efficiency(lengths, rows, task.max_seq_length)
    logger.info("data.pack: %d examples in %d rows of %d tokens, %.1f%% of them real",
                len(lengths), len(rows), task.max_seq_length, 100 * real)
    return rows, {"packing_efficiency": real}


def _model_inputs(config, prepared: Prepared):
    """batch, split -> the model's inputs: the task's, without token_type_ids for a family
    that takes none (GPT-BERT)."""
    module = family_of_config(config).build_module(config)
    takes_types = "token_type_ids" in inspect.signature(module.__call__).parameters

    def inputs(batch: dict, split: str) -> dict:
        batch = prepared.model_batch(dict(batch), split)
        if not takes_types:
            del batch["token_type_ids"]
        return batch

    return inputs


def _with_checkpoint_labels(task, saved_config):
    """A checkpoint fine-tuned for this task already has a label map: keep its ids (as
    transformers' run_glue / run_ner do) unless the recipe gives one."""
    names = saved_config.labels or ()
    default = tuple(f"LABEL_{i}" for i in range(len(names)))
    if (saved_config.head == task.HEAD and getattr(task, "labels", ()) is None
            and names != default and getattr(task, "problem_type", None) != "regression"):
        return dataclasses.replace(task, labels=list(names))
    return task


def _best_metric(name: str | None, prepared: Prepared) -> str:
    known = ("loss", *prepared.metrics)
    name = (name or prepared.metrics[0]).removeprefix("eval_")
    if name not in known:
        raise BertJaxError(f"train.best_metric: {name!r} is not one of this task's metrics "
                           f"({', '.join(known)})")
    return f"eval_{name}"


class _Best:
    """The best evaluation so far by `metric` (lower is better for losses, higher for the
    rest, as transformers' Trainer); `save(params)` keeps its model."""

    def __init__(self, metric: str, save):
        self.metric, self._save = metric, save
        self.step: int | None = None
        self.value: float | None = None

    def get_state(self) -> dict:
        return {"step": self.step, "value": self.value}

    def set_state(self, state: dict) -> None:
        self.step, self.value = state["step"], state["value"]

    def update(self, step: int, metrics: dict, params) -> None:
        value = metrics[self.metric]
        lower = self.metric.endswith("loss")
        if self.value is None or (value < self.value if lower else value > self.value):
            self._save(params)
            self.step, self.value = step, value

