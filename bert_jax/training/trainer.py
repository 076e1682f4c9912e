"""The pretraining loop behind `bert-jax pretrain`.

Builds the model (from a preset, or from an HF / Orbax directory for continued
pretraining), the sharded train state, the Grain input pipeline and the checkpoints; then
trains with a progress bar, JSONL logs on process 0, periodic eval and checkpoints, a guard
against non-finite losses, and a SIGTERM handler that saves before exiting (TPU spot
preemption). `resume=True` continues from the newest complete checkpoint, data included. A finished
run leaves `hf/` (an export transformers loads) and `loss.png` in its directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from bert_jax import sharding
from bert_jax.data.pipeline import bert_pipeline
from bert_jax.data.prepare import read_shards
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling.config import BertConfig
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel, from_pretrained
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.optimizer import build_optimizer, learning_rate_schedule
from bert_jax.training.plots import plot_loss
from bert_jax.training.recipe import Recipe
from bert_jax.training.train_step import (
    create_train_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)


def build_model(recipe: Recipe, vocab_size: int):
    """(config, params or None): a preset from scratch (with the tokenizer's vocabulary size
    unless the recipe overrides it), or a checkpoint to continue."""
    m = recipe.model
    head = "ForPreTraining" if recipe.data.nsp else "ForMaskedLM"
    runtime = dict(dtype=m.dtype, remat=m.remat)
    if (m.preset is None) == (m.init_from is None):
        raise BertJaxError("recipe model: give exactly one of preset or init_from")
    if m.init_from is not None:
        model = from_pretrained(m.init_from, **runtime)
        config = model.config.with_head(head)
        if not isinstance(config, BertConfig):
            raise BertJaxError("pretraining GPT-BERT is not supported yet (BERT / Megatron only)")
        return config, from_pretrained(m.init_from, head=head, **runtime).params
    config = preset(m.preset, **runtime, **{"vocab_size": vocab_size, **m.overrides})
    if not isinstance(config, BertConfig):
        raise BertJaxError("pretraining GPT-BERT is not supported yet (BERT / Megatron only)")
    return config.with_head(head), None


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def pretrain(recipe: Recipe, tokenizer_dir: str | Path, resume: bool = False,
             progress: bool = True) -> dict:
    """Train as `recipe` says; returns the last logged metrics."""
    out = Path(recipe.train.output_dir)
    main_process = jax.process_index() == 0
    tokenizer = load_tokenizer(tokenizer_dir)
    config, init_params = build_model(recipe, tokenizer.backend.get_vocab_size())
    mesh = sharding.make_mesh(recipe.mesh)
    sharding.check_batch_size(recipe.data.global_batch_size, mesh)
    optimizer = build_optimizer(recipe.optimizer)
    schedule = learning_rate_schedule(recipe.optimizer)
    data = _pipeline(recipe, recipe.data.train, config, tokenizer, recipe.train.seed)

    checkpoints = TrainCheckpoints(out / "checkpoints", max_to_keep=recipe.train.keep_checkpoints)
    latest = checkpoints.latest_step() if resume else None
    if latest is not None:
        state, record = checkpoints.restore(latest, _abstract_state(config, optimizer, mesh))
        data.set_state(record["data"])
    else:
        if checkpoints.latest_step() is not None:
            raise BertJaxError(f"{out / 'checkpoints'}: holds checkpoints; pass --resume to "
                               f"continue them, or choose another train.output_dir")
        state = create_train_state(config, optimizer, mesh, recipe.train.seed, init_params)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))

    step_fn = make_train_step(config, optimizer, mesh, schedule)
    eval_fn = make_eval_step(config, mesh) if recipe.data.eval else None
    batch_sharding = sharding.batch_sharding(mesh, 1)
    preemption = _Preemption()
    log = (out / "log.jsonl").open("a") if main_process else None
    start_step = int(state.step)
    bar = tqdm(total=recipe.train.steps, initial=start_step, disable=not (progress and main_process),
               desc="pretrain", unit="step")
    metrics, bad_in_a_row, tokens, clock = {}, 0, 0, time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step, recipe.train.steps):
                batch = _global(next(data), batch_sharding)
                state, step_metrics = step_fn(state, batch)
                tokens += int(np.sum(batch["attention_mask"]))
                bad_in_a_row = bad_in_a_row + 1 if bool(step_metrics["skipped"]) else 0
                if bad_in_a_row >= recipe.train.max_bad_steps:
                    raise BertJaxError(f"{bad_in_a_row} non-finite losses in a row at step "
                                       f"{step + 1}; the last good checkpoint is kept in {out}")
                done = step + 1
                if done % recipe.train.log_every == 0 or done == recipe.train.steps:
                    elapsed = time.perf_counter() - clock
                    metrics = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                               "tokens_per_second": tokens / elapsed}
                    tokens, clock = 0, time.perf_counter()
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    tok_s=f"{metrics['tokens_per_second']:,.0f}")
                    _write(log, metrics)
                if eval_fn is not None and (done % recipe.train.eval_every == 0
                                            or done == recipe.train.steps):
                    metrics = {"step": done, **evaluate(eval_fn, state.params, recipe, config,
                                                        tokenizer, batch_sharding)}
                    _write(log, metrics)
                if done % recipe.train.save_every == 0 or preemption.requested:
                    checkpoints.save(done, state, {"data": data.get_state()})
                bar.update(1)
                if preemption.requested:
                    break
            if not preemption.requested:
                checkpoints.save(recipe.train.steps, state, {"data": data.get_state()})
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        preemption.restore()
        if log is not None:
            log.close()
    if main_process and not preemption.requested:
        params = jax.device_get(state.params)
        PretrainedModel(config, params, Path(tokenizer_dir)).save_pretrained(out / "hf")
        plot_loss(out / "log.jsonl", out / "loss.png")
    return metrics


def evaluate(eval_fn, params, recipe: Recipe, config, tokenizer, batch_sharding) -> dict:
    """Held-out MLM loss, accuracy and perplexity (and NSP accuracy) over fixed batches."""
    data = _pipeline(recipe, recipe.data.eval, config, tokenizer, seed=12345)
    sums: dict = {}
    for _ in range(recipe.train.eval_batches):
        for key, value in eval_fn(params, _global(next(data), batch_sharding)).items():
            sums[key] = sums.get(key, 0) + float(value)
    loss = sums["mlm_loss_sum"] / max(sums["mlm_tokens"], 1)
    result = {"eval_mlm_loss": loss, "eval_mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_tokens"], 1),
              "eval_perplexity": math.exp(min(loss, 50))}
    if "nsp_examples" in sums:
        result["eval_nsp_accuracy"] = sums["nsp_correct"] / sums["nsp_examples"]
    return result


def _pipeline(recipe: Recipe, data_dir: str, config, tokenizer, seed: int):
    d = recipe.data
    ids = {name: tokenizer.backend.token_to_id(token) for name, token in
           (("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]"))}
    if None in ids.values() or tokenizer.mask_token_id is None:
        raise BertJaxError("the tokenizer needs [CLS], [SEP], [PAD] and a mask token for BERT "
                           "pretraining")
    return bert_pipeline(read_shards(data_dir), seed=seed, global_batch_size=d.global_batch_size,
                         max_seq_length=d.max_seq_length, vocab_size=config.vocab_size,
                         mask_id=tokenizer.mask_token_id, mlm_probability=d.mlm_probability,
                         max_predictions_per_seq=d.max_predictions_per_seq, nsp=d.nsp,
                         short_seq_prob=d.short_seq_prob, process_index=jax.process_index(),
                         process_count=jax.process_count(), **ids)


def _global(local_batch: dict, batch_sharding) -> dict:
    """This process's share of a batch -> global arrays over the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local_batch.items() if k != "example_id"}


def _abstract_state(config, optimizer, mesh):
    shapes = jax.eval_shape(lambda: create_train_state(config, optimizer, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(config, optimizer, mesh))


def _write(log, metrics: dict) -> None:
    if log is not None:
        log.write(json.dumps(metrics) + "\n")
        log.flush()
