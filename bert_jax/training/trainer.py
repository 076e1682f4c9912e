"""Pretraining behind `bert-jax pretrain`.

Builds the model (from a preset, or from an HF / Orbax directory for continued
pretraining), the sharded train state, the Grain input pipeline (`objectives`) and the
checkpoints, then trains in the loop `bert-jax finetune` shares (`loop.train_loop`: progress
bar, JSONL + TensorBoard logs on process 0, throughput and MFU, a non-finite loss guard,
checkpoints, SIGTERM save-and-exit), evaluating the held-out masked-LM loss from step 0 on.
`resume=True` continues from the newest complete checkpoint, data included. A finished run
leaves `hf/` (an export transformers loads) and `loss.png`. Every process runs this same
function in a multi-host run (`bert_jax.distributed`).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils

from bert_jax import sharding
from bert_jax.data.tokenizer import Tokenizer, load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel, from_pretrained
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.loop import (
    LoopSettings,
    Throughput,
    global_batch,
    restore_or_create,
    run_directory,
    train_loop,
    use_compilation_cache,
)
from bert_jax.training.objectives import (
    export_config,
    pretraining_head,
    pretraining_pipeline,
    private_pipeline,
    special_token_ids,
)
from bert_jax.training.optimizer import build_optimizer, learning_rate_schedule
from bert_jax.training.plots import plot_loss
from bert_jax.training.privacy import make_dp_train_step
from bert_jax.training.recipe import Recipe
from bert_jax.training.run_log import ExampleIdLog, RunLog
from bert_jax.training.train_step import create_train_state, make_eval_step, make_train_step


def build_model(recipe: Recipe, tokenizer: Tokenizer):
    """(config, params or None): a preset from scratch (with the tokenizer's vocabulary size
    and special-token ids unless the recipe overrides them), or a checkpoint to continue."""
    m = recipe.model
    runtime = dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers)
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
    out = epath.Path(recipe.train.output_dir)  # local or gs://
    use_compilation_cache(recipe.train.compilation_cache_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    config, init_params = build_model(recipe, tokenizer)
    mesh = sharding.make_mesh(recipe.mesh)
    sharding.check_batch_size(recipe.data.global_batch_size, mesh)
    optimizer = build_optimizer(recipe.optimizer)
    schedule = learning_rate_schedule(recipe.optimizer)
    if recipe.dp is None:
        data = pretraining_pipeline(recipe.data, recipe.data.train, config, tokenizer,
                                    recipe.train.seed)
        step_fn, logged_with = make_train_step(config, optimizer, mesh, schedule), None
    else:
        data, plan = private_pipeline(recipe.data, recipe.dp, config, tokenizer,
                                      recipe.train.seed, recipe.train.steps, mesh)
        step_fn = make_dp_train_step(config, optimizer, mesh, plan, schedule)

        def logged_with(step):  # the guarantee so far, at the recipe's delta
            return {"epsilon": plan.epsilon(step), "noise_multiplier": plan.noise_multiplier}

    checkpoints = TrainCheckpoints(out / "checkpoints", max_to_keep=recipe.train.keep_checkpoints)
    state, record = restore_or_create(
        checkpoints, resume, config, optimizer, mesh,
        lambda: create_train_state(config, optimizer, mesh, recipe.train.seed, init_params))
    if record is not None:
        data.set_state(record["data"])
    run_directory(out, recipe, config, tokenizer_dir)

    batch_sharding = sharding.batch_sharding(mesh, 1)
    eval_fn = make_eval_step(config, mesh) if recipe.data.eval else None
    t = recipe.train
    log = RunLog(out, enabled=jax.process_index() == 0)
    consumed = ExampleIdLog(out, enabled=t.record_example_ids)
    try:
        state, metrics, preempted = train_loop(
            state, step_fn, data,
            settings=LoopSettings(t.steps, t.log_every, t.eval_every, t.save_every,
                                  t.max_bad_steps),
            mesh=mesh, batch_sharding=batch_sharding, checkpoints=checkpoints,
            record=lambda: {"data": data.get_state()}, log=log,
            throughput=Throughput(config, state.params, recipe.data.max_seq_length),
            evaluate=None if eval_fn is None else lambda s: evaluate(
                eval_fn, s.params, recipe, config, tokenizer, batch_sharding),
            eval_at_start=True,  # the baseline the curve starts from
            consumed=consumed, logged_with=logged_with, progress=progress, desc="pretrain")
    finally:
        checkpoints.close()
        log.close()
        consumed.close()
    if not preempted:
        params = multihost_utils.process_allgather(state.params, tiled=True)  # every process
        if jax.process_index() == 0:
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
        for key, value in eval_fn(params, global_batch(next(data), batch_sharding)).items():
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
