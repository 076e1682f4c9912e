"""`bert-jax export`: any saved step of a training run as a model directory (HF or Orbax).

A run directory holds, besides `checkpoints/`, what `run.run_directory` wrote at its start:
`recipe.json` (the optimizer, whose state is part of the TrainState to restore),
`model_config.json` (the trained model's config) and `tokenizer/`. The TrainState is restored
onto this process's devices, whatever mesh saved it, and its params are written as the run's
own export writes them: a pretraining run's with `objectives.export_config`, a fine-tuning
run's as trained (task head, id2label / label2id, problem_type).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from etils import epath

from bert_jax import sharding
from bert_jax.convert.families import family_of
from bert_jax.errors import BertJaxError
from bert_jax.files import local_copy, read_json
from bert_jax.pretrained import PretrainedModel
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.objectives import export_config
from bert_jax.training.optimizer import OptimizerConfig, OptimizerSettings, build_optimizer
from bert_jax.training.run import LAYOUT_FIELDS, abstract_state

RUN_FILES = ("recipe.json", "model_config.json", "model_layout.json", "tokenizer", "checkpoints")


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                      *, format: str = "hf", overwrite: bool = False) -> int:
    """Write the model of `run_dir`'s checkpoint `step` (default: the newest complete one) to
    `out`; returns the step exported."""
    run = epath.Path(run_dir)
    missing = [name for name in RUN_FILES if not (run / name).exists()]
    if missing:
        raise BertJaxError(f"{run}: not a run directory of bert-jax pretrain or finetune "
                           f"(no {', '.join(missing)})")
    if not overwrite and epath.Path(out).exists():
        raise BertJaxError(f"{out}: already exists (pass --overwrite to replace it)")
    recipe = read_json(run / "recipe.json")
    fine_tuned = "task" in recipe.get("data", {})  # only fine-tuning data sections name a task
    hf_config = read_json(run / "model_config.json")
    layout = read_json(run / "model_layout.json")  # the params' as checkpointed
    config = family_of(hf_config, str(run / "model_config.json")).config_cls.from_hf_dict(
        hf_config, **{name: layout[name] for name in LAYOUT_FIELDS}, allow_replication=True)
    optimizer = build_optimizer(_optimizer_config(recipe["optimizer"]))
    checkpoints = TrainCheckpoints(run / "checkpoints")
    try:
        step = _choose_step(checkpoints, step)
        target = abstract_state(config, optimizer, sharding.make_mesh())
        try:
            state, _ = checkpoints.restore(step, target)
        except BertJaxError:
            raise
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise BertJaxError(f"{checkpoints.directory / str(step)}: an incomplete or damaged "
                               f"checkpoint ({type(err).__name__}: {err})") from None
    finally:
        checkpoints.close()
    model = PretrainedModel(config if fine_tuned else export_config(config),
                            jax.device_get(state.params), local_copy(run / "tokenizer"))
    model.save_pretrained(out, format=format)
    return step


def _optimizer_config(section: dict) -> OptimizerConfig:
    """The run's optimizer settings; the schedule (whose length follows from the run) does
    not change the optimizer state's structure, so one step without warmup stands in."""
    shared = {f.name: section[f.name] for f in dataclasses.fields(OptimizerSettings)
              if f.name in section}
    return OptimizerConfig(**shared, warmup_steps=0, total_steps=1)


def _choose_step(checkpoints: TrainCheckpoints, step: int | None) -> int:
    steps = checkpoints.all_steps()
    if step in steps or (step is None and steps):
        return steps[-1] if step is None else step
    where = checkpoints.directory
    if step in checkpoints.incomplete_steps():
        raise BertJaxError(f"{where}: checkpoint {step} is incomplete (its save never "
                           f"finished); complete ones: {', '.join(map(str, steps)) or 'none'}")
    if step is None:
        raise BertJaxError(f"{where}: no complete checkpoint to export")
    raise BertJaxError(f"{where}: no checkpoint of step {step} (available: "
                       f"{', '.join(map(str, steps)) or 'none'})")
