"""The run around the training loop, as `pretrain` and `finetune` both set it up.

`TrainingRun` builds the optimizer and its schedule, the train step (DP-SGD's when the data
was drawn by a privacy plan, whose epsilon so far is then logged), the checkpoints and the
state restored from them (`restore_or_create`) or created, the run directory
(`run_directory`) and the logs; `train` runs `loop.train_loop` on them, and leaving the
`with` block closes them. What differs between the two trainers stays with them: the model,
the data, what evaluation means, extra checkpoint records (fine-tuning's best model) and the
export (`save_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
from etils import epath
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

from bert_jax import sharding
from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, copy_tokenizer_files
from bert_jax.pretrained import PretrainedModel
from bert_jax.sharding import MeshConfig
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.loop import LoopSettings, Throughput, train_loop
from bert_jax.training.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule
from bert_jax.training.privacy import DpPlan, make_dp_train_step
from bert_jax.training.run_log import ExampleIdLog, RunLog
from bert_jax.training.train_step import (
    TrainState,
    create_train_state,
    make_train_step,
    state_shardings,
)

MIN_CACHED_COMPILE_SECONDS = 1.0
# The runtime settings that shape the params in checkpoints (`model_layout.json`)
LAYOUT_FIELDS = ("scan_layers", "vocab_multiple")


def use_compilation_cache(directory: str | None) -> None:
    """Keep this process's expensive compiled programs (the train and eval steps: those that
    took `MIN_CACHED_COMPILE_SECONDS` or more) in `directory`, so a restarted run skips XLA
    compilation; None turns the cache off."""
    path = None if directory is None else os.path.expanduser(directory)
    if path == jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
    compilation_cache.reset_cache()  # a compile before this call has settled "no cache"


def checked_mesh(config: MeshConfig, train_batch: int, *eval_batches: int,
                 accumulation_steps: int = 1, devices=None):
    """The recipe's device mesh (over `devices`, default all), once every batch is known to
    split over it: the train batch's `accumulation_steps` micro-batches and the
    `eval_batches`."""
    mesh = sharding.make_mesh(config, devices=devices)
    if train_batch % accumulation_steps:
        raise BertJaxError(f"optimizer.accumulation_steps={accumulation_steps} does not divide "
                           f"the global batch of {train_batch}")
    for batch_size in (train_batch // accumulation_steps, *eval_batches):
        sharding.check_batch_size(batch_size, mesh)
    return mesh


def mesh_layout(mesh_config: MeshConfig, mesh) -> dict:
    """The model's runtime settings for `mesh`: the vocabulary padded to a multiple of 128 x
    the tensor axis (Megatron's and MaxText's rule, so the embedding and decoder split over
    it), and the recipe's choice for other params the mesh does not divide."""
    return {"vocab_multiple": sharding.vocab_multiple(mesh),
            "allow_replication": mesh_config.allow_replication}


class TrainingRun:
    """One run of a recipe (`recipe.train` its run settings, `recipe.data.max_seq_length` its
    rows' length) of the model `config`, from `params` (None: a fresh init).

    `records` are what each checkpoint saves besides the train state, by name: objects with
    `get_state()` and `set_state(state)` (the data iterator as "data", fine-tuning's best
    model); `resume` restores them and the state from the newest checkpoint. `plan` is the
    privacy plan that draws the data for DP-SGD, else None.
    """

    def __init__(self, recipe, *, config, params, tokenizer_dir: str | Path, mesh,
                 optimizer_config: OptimizerConfig, plan: DpPlan | None, records: dict,
                 resume: bool, record_example_ids: bool = False):
        t = recipe.train
        self.out = epath.Path(t.output_dir)  # local or gs://
        self.mesh, self.batch_sharding = mesh, sharding.batch_sharding(mesh, 1)
        self._recipe, self._config, self._plan, self._records = recipe, config, plan, records
        optimizer, self._step_fn = train_step(config, optimizer_config, mesh, plan)
        self._checkpoints = TrainCheckpoints(self.out / "checkpoints",
                                             max_to_keep=t.keep_checkpoints)
        self.state, record = restore_or_create(
            self._checkpoints, resume, config, optimizer, mesh,
            lambda: create_train_state(config, optimizer, mesh, t.seed, params))
        self.resumed = record is not None
        if self.resumed:
            for name, part in records.items():
                part.set_state(record[name])
        run_directory(self.out, recipe, config, tokenizer_dir)
        self.log = RunLog(self.out, enabled=jax.process_index() == 0)
        self._consumed = ExampleIdLog(self.out, enabled=record_example_ids)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self._checkpoints.close()
        self.log.close()
        self._consumed.close()

    def train(self, data, *, steps: int, eval_every: int, save_every: int,
              evaluate: Callable[[TrainState], dict] | None, eval_at_start: bool = False,
              progress: bool = True, desc: str = "train") -> tuple[dict, bool]:
        """`loop.train_loop` to `steps` -> (the last logged metrics, whether a SIGTERM stopped
        the run early); `self.state` is then the trained state."""
        t = self._recipe.train
        self.state, metrics, preempted = train_loop(
            self.state, self._step_fn, data,
            settings=LoopSettings(steps, t.log_every, eval_every, save_every, t.max_bad_steps),
            mesh=self.mesh, batch_sharding=self.batch_sharding, checkpoints=self._checkpoints,
            record=lambda: {name: part.get_state() for name, part in self._records.items()},
            log=self.log, throughput=Throughput(self._config, self.state.params,
                                                self._recipe.data.max_seq_length),
            evaluate=evaluate, eval_at_start=eval_at_start, consumed=self._consumed,
            logged_with=None if self._plan is None else self._plan.guarantee,
            progress=progress, desc=desc)
        return metrics, preempted


def train_step(config, optimizer_config: OptimizerConfig, mesh, plan: DpPlan | None):
    """(optimizer, jitted step(state, batch)) of a run: DP-SGD's step when `plan` draws its
    data. What `TrainingRun` trains with and `compile` compiles ahead of time."""
    optimizer = build_optimizer(optimizer_config)
    schedule = learning_rate_schedule(optimizer_config)
    accumulation = optimizer_config.accumulation_steps
    if plan is not None and accumulation > 1:
        raise BertJaxError("optimizer.accumulation_steps: DP-SGD runs take 1 (dp.chunk_size "
                           "bounds their memory instead)")
    step = (make_train_step(config, optimizer, mesh, schedule, accumulation) if plan is None
            else make_dp_train_step(config, optimizer, mesh, plan, schedule))
    return optimizer, step


def restore_or_create(checkpoints: TrainCheckpoints, resume: bool, config, optimizer, mesh,
                      create: Callable[[], TrainState]) -> tuple[TrainState, dict | None]:
    """(state, its checkpoint's record) of the newest checkpoint when resuming, else
    (`create()`, None). Checkpoints left by another run are never silently overwritten."""
    latest = checkpoints.latest_step() if resume else None
    if latest is not None:
        return checkpoints.restore(latest, abstract_state(config, optimizer, mesh))
    if checkpoints.latest_step() is not None:
        raise BertJaxError(f"{checkpoints.directory}: holds checkpoints; pass --resume to "
                           f"continue them, or choose another train.output_dir")
    return create(), None


def abstract_state(config, optimizer, mesh):
    """The TrainState's shapes, dtypes and shardings: a restore target, nothing allocated."""
    shapes = jax.eval_shape(lambda: create_train_state(config, optimizer, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(config, optimizer, mesh))


def run_directory(out: epath.Path, recipe, config, tokenizer_dir: str | Path) -> None:
    """Create the run directory (local or gs://) and write there (process 0) what
    `bert-jax export` needs besides the checkpoints: the recipe, the trained model's config
    (`model_config.json`) and the tokenizer (`tokenizer/`)."""
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
        (out / "model_config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        (out / "model_layout.json").write_text(json.dumps(
            {name: getattr(config, name) for name in LAYOUT_FIELDS}, indent=2))
        with atomic_directory(out / "tokenizer") as staging:
            copy_tokenizer_files(Path(tokenizer_dir), staging)


def save_model(config, params, tokenizer_dir: str | Path, where: epath.Path) -> None:
    """An HF directory of the (possibly sharded, multi-host) params, written by process 0;
    every process takes part in gathering them."""
    params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        PretrainedModel(config, params, Path(tokenizer_dir)).save_pretrained(where)
