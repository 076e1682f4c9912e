"""Pretraining behind `bert-jax pretrain`.

Builds the model (from a preset, or from an HF / Orbax directory for continued
pretraining), the sharded train state, the Grain input pipeline (`objectives`) and the
checkpoints, then trains in the run `bert-jax finetune` shares (`run.TrainingRun` around
`loop.train_loop`: progress bar, JSONL + TensorBoard logs on process 0, throughput and MFU, a
non-finite loss guard, checkpoints, SIGTERM save-and-exit), evaluating the held-out masked-LM
loss from step 0 on.
`resume=True` continues from the newest complete checkpoint, data included. A finished run
leaves `hf/` (an export transformers loads) and `loss.png`. Every process runs this same
function in a multi-host run (`bert_jax.distributed`).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax

from bert_jax.data.tokenizer import Tokenizer, load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import from_pretrained, load_config, resolve
from bert_jax.training.loop import global_batch
from bert_jax.training.objectives import (
    export_config,
    pretraining_head,
    pretraining_pipeline,
    private_pipeline,
    special_token_ids,
)
from bert_jax.training.plots import plot_loss
from bert_jax.training.recipe import Recipe
from bert_jax.training.run import (
    TrainingRun,
    checked_mesh,
    mesh_layout,
    save_model,
    use_compilation_cache,
)
from bert_jax.training.train_step import make_eval_step


def build_model(recipe: Recipe, tokenizer: Tokenizer, mesh):
    """(config, params or None): a preset from scratch (with the tokenizer's vocabulary size
    and special-token ids unless the recipe overrides them), or a checkpoint to continue,
    its params placed on `mesh`."""
    m = recipe.model
    runtime = {**m.runtime(), **mesh_layout(recipe.mesh, mesh)}
    if (m.preset is None) == (m.init_from is None):
        raise BertJaxError("recipe model: give exactly one of preset or init_from")
    if m.init_from is not None:
        head = pretraining_head(load_config(resolve(m.init_from), **runtime), recipe.data.nsp)
        model = from_pretrained(m.init_from, head=head, mesh=mesh, **runtime)
        return model.config, model.params
    tokens = {"vocab_size": tokenizer.backend.get_vocab_size(),
              **special_token_ids(preset(m.preset), tokenizer)}
    config = preset(m.preset, **runtime, **{**tokens, **m.overrides})
    return config.with_head(pretraining_head(config, recipe.data.nsp)), None


def pretrain(recipe: Recipe, tokenizer_dir: str | Path, resume: bool = False,
             progress: bool = True) -> dict:
    """Train as `recipe` says; returns the last logged metrics."""
    t = recipe.train
    use_compilation_cache(t.compilation_cache_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    optimizer_config = recipe.optimizer.optimizer_config(t.steps)
    mesh = checked_mesh(recipe.mesh, recipe.data.global_batch_size,
                        accumulation_steps=optimizer_config.accumulation_steps)
    config, init_params = build_model(recipe, tokenizer, mesh)
    if recipe.dp is None:
        data = pretraining_pipeline(recipe.data, recipe.data.train, config, tokenizer, t.seed)
        plan = None
    else:
        data, plan = private_pipeline(recipe.data, recipe.dp, config, tokenizer, t.seed, t.steps,
                                      mesh)
    eval_fn = make_eval_step(config, mesh) if recipe.data.eval else None
    with TrainingRun(recipe, config=config, params=init_params, tokenizer_dir=tokenizer_dir,
                     mesh=mesh, optimizer_config=optimizer_config, plan=plan,
                     records={"data": data}, resume=resume,
                     record_example_ids=t.record_example_ids) as run:
        metrics, preempted = run.train(
            data, steps=t.steps, eval_every=t.eval_every, save_every=t.save_every,
            evaluate=None if eval_fn is None else lambda s: evaluate(
                eval_fn, s.params, recipe, config, tokenizer, run.batch_sharding),
            eval_at_start=True,  # the baseline the curve starts from
            progress=progress, desc="pretrain")
    if not preempted:
        save_model(export_config(config), run.state.params, tokenizer_dir, run.out / "hf")
        if jax.process_index() == 0:
            plot_loss(run.out / "log.jsonl", run.out / "loss.png")
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
