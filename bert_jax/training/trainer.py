"""The pretraining loop behind `bert-jax pretrain`.

Builds the model (from a preset, or from an HF / Orbax directory for continued
pretraining), the sharded train state, the Grain input pipeline (`objectives`) and the
checkpoints; then trains with a progress bar (loss, tokens/s, ETA), logs on process 0
(`run_log`: JSONL and TensorBoard; model FLOPs utilisation on accelerators), periodic eval,
checkpoints, a guard against non-finite losses, and a SIGTERM handler that saves before
exiting (TPU spot preemption). `resume=True` continues from the newest complete checkpoint,
data included. A finished run leaves `hf/` (an export transformers loads) and `loss.png`.
Every process runs this same function in a multi-host run (`bert_jax.distributed`).
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
from jax.experimental import multihost_utils
from tqdm import tqdm

from bert_jax import sharding
from bert_jax.data.tokenizer import Tokenizer, load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel, from_pretrained
from bert_jax.training import flops
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.objectives import (
    export_config,
    pretraining_head,
    pretraining_pipeline,
    special_token_ids,
)
from bert_jax.training.optimizer import build_optimizer, learning_rate_schedule
from bert_jax.training.plots import plot_loss
from bert_jax.training.recipe import Recipe
from bert_jax.training.run_log import ExampleIdLog, RunLog
from bert_jax.training.train_step import (
    create_train_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)


def build_model(recipe: Recipe, tokenizer: Tokenizer):
    """(config, params or None): a preset from scratch (with the tokenizer's vocabulary size
    and special-token ids unless the recipe overrides them), or a checkpoint to continue."""
    m = recipe.model
    runtime = dict(dtype=m.dtype, remat=m.remat)
    if (m.preset is None) == (m.init_from is None):
        raise BertJaxError("recipe model: give exactly one of preset or init_from")
    if m.init_from is not None:
        config = from_pretrained(m.init_from, **runtime).config
        head = pretraining_head(config, recipe.data.nsp)
        return config.with_head(head), from_pretrained(m.init_from, head=head, **runtime).params
    tokens = {"vocab_size": tokenizer.backend.get_vocab_size(),
              **special_token_ids(preset(m.preset), tokenizer)}
    config = preset(m.preset, **runtime, **{**tokens, **m.overrides})
    return config.with_head(pretraining_head(config, recipe.data.nsp)), None


def pretrain(recipe: Recipe, tokenizer_dir: str | Path, resume: bool = False,
             progress: bool = True) -> dict:
    """Train as `recipe` says; returns the last logged metrics."""
    out = Path(recipe.train.output_dir)
    main_process = jax.process_index() == 0
    tokenizer = load_tokenizer(tokenizer_dir)
    config, init_params = build_model(recipe, tokenizer)
    mesh = sharding.make_mesh(recipe.mesh)
    sharding.check_batch_size(recipe.data.global_batch_size, mesh)
    optimizer = build_optimizer(recipe.optimizer)
    schedule = learning_rate_schedule(recipe.optimizer)
    data = pretraining_pipeline(recipe.data, recipe.data.train, config, tokenizer,
                                recipe.train.seed)

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
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))

    step_fn = make_train_step(config, optimizer, mesh, schedule)
    eval_fn = make_eval_step(config, mesh) if recipe.data.eval else None
    batch_sharding = sharding.batch_sharding(mesh, 1)
    throughput = _Throughput(config, state.params, recipe.data.max_seq_length)
    preemption = _Preemption()
    log = RunLog(out, enabled=main_process)
    consumed = ExampleIdLog(out, enabled=recipe.train.record_example_ids)
    start_step = int(state.step)
    bar = tqdm(total=recipe.train.steps, initial=start_step, disable=not (progress and main_process),
               desc="pretrain", unit="step")
    metrics, bad_in_a_row = {}, 0
    try:
        with jax.set_mesh(mesh):
            if eval_fn is not None and start_step == 0:  # the baseline the curve starts from
                log.write({"step": 0, **evaluate(eval_fn, state.params, recipe, config,
                                                 tokenizer, batch_sharding)})
            for step in range(start_step, recipe.train.steps):
                local_batch = next(data)
                state, step_metrics = step_fn(state, _global(local_batch, batch_sharding))
                throughput.count(local_batch["attention_mask"])
                consumed.write(step + 1, local_batch["example_id"])
                bad_in_a_row = bad_in_a_row + 1 if bool(step_metrics["skipped"]) else 0
                if bad_in_a_row >= recipe.train.max_bad_steps:
                    raise BertJaxError(f"{bad_in_a_row} non-finite losses in a row at step "
                                       f"{step + 1}; the last good checkpoint is kept in {out}")
                done = step + 1
                if done % recipe.train.log_every == 0 or done == recipe.train.steps:
                    metrics = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                               **throughput.report()}
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    tok_s=f"{metrics['tokens_per_second']:,.0f}")
                    log.write(metrics)
                if eval_fn is not None and (done % recipe.train.eval_every == 0
                                            or done == recipe.train.steps):
                    metrics = {"step": done, **evaluate(eval_fn, state.params, recipe, config,
                                                        tokenizer, batch_sharding)}
                    log.write(metrics)
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
        log.close()
        consumed.close()
    if not preemption.requested:
        params = multihost_utils.process_allgather(state.params, tiled=True)  # every process
        if main_process:
            PretrainedModel(export_config(config), params, Path(tokenizer_dir)).save_pretrained(
                out / "hf")
            plot_loss(out / "log.jsonl", out / "loss.png")
    return metrics


def evaluate(eval_fn, params, recipe: Recipe, config, tokenizer, batch_sharding) -> dict:
    """Held-out loss, accuracy and perplexity of the masked tokens (and of GPT-BERT's causal
    rows, and NSP accuracy) over the same `eval_batches` batches every time."""
    data = pretraining_pipeline(recipe.data, recipe.data.eval, config, tokenizer, seed=12345)
    sums: dict = {}
    for _ in range(recipe.train.eval_batches):
        for key, value in eval_fn(params, _global(next(data), batch_sharding)).items():
            sums[key] = sums.get(key, 0) + float(value)
    result = {}
    for name in ("mlm", "causal"):
        if f"{name}_tokens" in sums:
            tokens = max(sums[f"{name}_tokens"], 1)
            loss = sums[f"{name}_loss_sum"] / tokens
            result |= {f"eval_{name}_loss": loss,
                       f"eval_{name}_accuracy": sums[f"{name}_correct"] / tokens,
                       f"eval_{name}_perplexity": math.exp(min(loss, 50))}
    if "nsp_examples" in sums:
        result["eval_nsp_accuracy"] = sums["nsp_correct"] / sums["nsp_examples"]
    return result


class _Throughput:
    """Tokens/s since the last report, over all processes, and MFU where the chip is known.

    Each process counts its own real (non-padding) tokens; the global figure scales that by
    the process count, as every process gets an equal share of the batch."""

    def __init__(self, config, params, seq_len: int):
        num_params = sum(x.size for x in jax.tree.leaves(params))
        self._flops_per_token = flops.training_flops_per_token(config, num_params, seq_len)
        self._peak = flops.peak_flops()
        self._tokens, self._clock = 0, time.perf_counter()

    def count(self, attention_mask) -> None:
        self._tokens += int(np.sum(attention_mask)) * jax.process_count()

    def report(self) -> dict:
        elapsed = time.perf_counter() - self._clock
        result = {"tokens_per_second": self._tokens / elapsed}
        if self._peak is not None:
            result["mfu"] = (result["tokens_per_second"] * self._flops_per_token
                             / (self._peak * jax.device_count()))
        self._tokens, self._clock = 0, time.perf_counter()
        return result


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _global(local_batch: dict, batch_sharding) -> dict:
    """This process's share of a batch -> global arrays over the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local_batch.items() if k != "example_id"}


def _abstract_state(config, optimizer, mesh):
    shapes = jax.eval_shape(lambda: create_train_state(config, optimizer, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(config, optimizer, mesh))
