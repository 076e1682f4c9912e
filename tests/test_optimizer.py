"""The optimizer: schedule values, the weight-decay mask on real param trees, step-for-step
parity with PyTorch AdamW + LambdaLR + clip_grad_norm_, accumulation, LAMB, bad configs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bert_jax
from bert_jax.convert.families import BERT, GPT_BERT
from bert_jax.errors import BertJaxError
from bert_jax.training.optimizer import (
    OptimizerConfig,
    build_optimizer,
    decay_mask,
    learning_rate_schedule,
)

torch = pytest.importorskip("torch")

LR = 1e-3


# ---------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("schedule, expected", [
    # at steps 0, 5 (mid-warmup), 10 (end of warmup), 35 (1/4 into decay), 60 (mid-decay),
    # 110 (total_steps) and 200 (past the end); warmup 10, total 110
    ("linear",   [0.0, LR / 2, LR, LR * 0.75, LR / 2, 0.0, 0.0]),
    ("cosine",   [0.0, LR / 2, LR, LR * 0.5 * (1 + math.cos(math.pi / 4)), LR / 2, 0.0, 0.0]),
    ("constant", [0.0, LR / 2, LR, LR, LR, LR, LR]),
])
def test_schedule_values(schedule, expected):
    config = OptimizerConfig(learning_rate=LR, warmup_steps=10, total_steps=110, schedule=schedule)
    fn = learning_rate_schedule(config)
    got = [float(fn(step)) for step in (0, 5, 10, 35, 60, 110, 200)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_schedule_without_warmup_starts_at_lr():
    fn = learning_rate_schedule(OptimizerConfig(learning_rate=LR, warmup_steps=0, total_steps=4))
    np.testing.assert_allclose([float(fn(s)) for s in range(5)],
                               [LR, LR * 0.75, LR / 2, LR / 4, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------- decay mask

def _at(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _check_mask(params, decays: list[str], keeps: list[str]):
    mask = decay_mask(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    for path in decays:
        assert _at(mask, path) is True, path
    for path in keeps:
        assert _at(mask, path) is False, path
    # Whole-tree invariant: only matrices/tables decay, and only weight-like names.
    for path, flag in jax.tree_util.tree_leaves_with_path(mask):
        name, leaf = path[-1].key, _at(params, "/".join(k.key for k in path))
        if flag:
            assert leaf.ndim >= 2 and name in {"kernel", "embedding", "query", "key", "linear",
                                                "gate"}, path
    return mask


def test_decay_mask_bert_pretraining():
    config = bert_jax.preset("tiny").with_head("ForPreTraining")
    params = BERT.init_params(config)
    _check_mask(params, decays=[
        "bert/embeddings/word_embeddings/embedding",
        "bert/embeddings/position_embeddings/embedding",
        "bert/embeddings/token_type_embeddings/embedding",
        "bert/layer_0/attention/query/kernel",
        "bert/layer_0/attention/out/kernel",
        "bert/layer_1/mlp_in/kernel",
        "mlm/transform/kernel",
        "nsp/dense/kernel",
    ], keeps=[
        "bert/embeddings/norm/scale",
        "bert/embeddings/norm/bias",
        "bert/layer_0/attention/query/bias",  # 2-D (heads, head_dim): excluded by name
        "bert/layer_0/attention/out/bias",
        "bert/layer_0/attention_norm/scale",
        "bert/layer_1/mlp_norm/bias",
        "mlm/bias",
        "mlm/transform_norm/scale",
        "nsp/dense/bias",
    ])


def test_decay_mask_gpt_bert_masked_lm():
    config = bert_jax.preset("norbert4-tiny")
    assert config.architectures == ("GptBertForMaskedLM",)
    params = GPT_BERT.init_params(config)
    _check_mask(params, decays=[
        "model/word_embedding/embedding",
        "model/layer_0/attention/qk_proj/query",
        "model/layer_0/attention/qk_proj/key",
        "model/layer_0/attention/v_proj/kernel",
        "model/layer_0/attention/out_proj/kernel",
        "model/layer_3/mlp/up_proj/linear",
        "model/layer_3/mlp/up_proj/gate",
        "model/layer_3/mlp/down_proj/kernel",
        "classifier/projection/kernel",
        "classifier/emb2vocab/kernel",
    ], keeps=[
        "model/word_scale",
        "model/layer_0/lambdas",
        "model/layer_0/attention/lambdas",
        "model/layer_0/attention/q_scale",  # 2-D: excluded by name
        "model/layer_0/attention/k_scale",
        "model/layer_0/attention/qk_proj/scale",
        "model/layer_0/attention/out_proj/scale",  # 2-D
        "model/layer_0/mlp/up_proj/scale",
        "classifier/emb2vocab/scale",
        "classifier/emb2vocab/bias",
    ])


def test_decay_mask_on_abstract_params():
    """Works on ShapeDtypeStructs, as when optimizer state is created already sharded."""
    params = GPT_BERT.init_params(bert_jax.preset("norbert4-tiny"))
    abstract = jax.eval_shape(lambda: params)
    assert decay_mask(abstract) == decay_mask(params)


# ---------------------------------------------------------------------------- PyTorch parity

def _torch_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # LN and biases away from 1/0
    return model


def _to_jax_tree(model):
    """Our naming for the torch MLP (Linear weight is [out, in]; kernel is [in, out])."""
    d1, ln, _, d2 = model
    t = lambda x: jnp.asarray(x.detach().numpy())  # noqa: E731
    return {"dense_1": {"kernel": t(d1.weight.T), "bias": t(d1.bias)},
            "norm": {"scale": t(ln.weight), "bias": t(ln.bias)},
            "dense_2": {"kernel": t(d2.weight.T), "bias": t(d2.bias)}}


def test_adamw_matches_torch_step_for_step():
    """Same init, same gradients (computed by torch, fed to both): params within 1e-6 after
    every one of 10 steps, through warmup, decay, masked weight decay and clipping.

    Both sides run in float64: in float32 the two frameworks' rounding alone drifts ~1 ulp
    per step (~2e-6 on O(1) LayerNorm scales after 10 steps), which would hide or fake an
    algorithmic difference at this tolerance. What remains is algorithmic: torch's clip
    divides by (norm + 1e-6), optax by norm.
    """
    lr, warmup, total, wd, clip = 5e-2, 3, 10, 0.1, 0.5
    model = _torch_mlp().double()
    with jax.enable_x64(True):
        params = _to_jax_tree(model)
        assert params["norm"]["scale"].dtype == jnp.float64

        matrices = [model[0].weight, model[3].weight]
        others = [model[0].bias, model[1].weight, model[1].bias, model[3].bias]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": wd},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.999), eps=1e-6)

        def warmup_linear(s):  # transformers' get_linear_schedule_with_warmup
            return s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear)

        tx = build_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=warmup,
                                             total_steps=total, weight_decay=wd, clip_norm=clip))
        state = tx.init(params)

        @jax.jit
        def update(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        torch.manual_seed(1)
        clipped = 0
        for step in range(total):
            x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            d1, ln, _, d2 = model
            grads = {"dense_1": {"kernel": d1.weight.grad.T, "bias": d1.bias.grad},
                     "norm": {"scale": ln.weight.grad, "bias": ln.bias.grad},
                     "dense_2": {"kernel": d2.weight.grad.T, "bias": d2.bias.grad}}
            grads = jax.tree_util.tree_map(lambda g: jnp.asarray(g.numpy().copy()), grads)
            clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) > clip
            opt.step()
            sched.step()
            params, state = update(grads, state, params)
            for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(params),
                                            jax.tree_util.tree_leaves(_to_jax_tree(model))):
                np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0,
                                           err_msg=f"step {step} {jax.tree_util.keystr(path)}")
    assert clipped >= 3  # clipping really was exercised


def test_mask_matters_in_the_parity_setup():
    """Decaying the biases too would move them by more than the 1e-6 tolerance, so the parity
    test above does check the mask."""
    params = _to_jax_tree(_torch_mlp())
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    config = OptimizerConfig(learning_rate=5e-2, warmup_steps=0, total_steps=10,
                             weight_decay=0.1)
    masked = build_optimizer(config)
    unmasked = optax.adamw(learning_rate_schedule(config), eps=1e-6, weight_decay=0.1)
    a, _ = masked.update(grads, masked.init(params), params)
    b, _ = unmasked.update(grads, unmasked.init(params), params)
    assert float(jnp.abs(a["norm"]["scale"] - b["norm"]["scale"]).max()) > 1e-4
    np.testing.assert_array_equal(a["dense_1"]["kernel"], b["dense_1"]["kernel"])


# ---------------------------------------------------------------------------- accumulation

def _params_and_grads(n: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 2 * n + 2)
    params = {"dense": {"kernel": jax.random.normal(keys[0], (5, 3)),
                        "bias": jax.random.normal(keys[1], (3,))}}
    grads = [{"dense": {"kernel": jax.random.normal(keys[2 + 2 * i], (5, 3)),
                        "bias": jax.random.normal(keys[3 + 2 * i], (3,))}} for i in range(n)]
    return params, grads


# ---------------------------------------------------------------------------- LAMB

def test_lamb_matches_optax_and_differs_from_adamw():
    params, grads = _params_and_grads(3, seed=1)
    config = OptimizerConfig(name="lamb", learning_rate=1e-2, warmup_steps=1, total_steps=10)
    reference = optax.lamb(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-6,
                           weight_decay=0.01, mask=decay_mask)
    adamw = build_optimizer(dataclasses.replace(config, name="adamw"))

    def run(tx):
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    ours, theirs, other = run(build_optimizer(config)), run(reference), run(adamw)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(ours))
    assert float(jnp.abs(ours["dense"]["kernel"] - other["dense"]["kernel"]).max()) > 1e-4


# ---------------------------------------------------------------------------- bad config

@pytest.mark.parametrize("field, value", [
    ("name", "sgd"), ("schedule", "step"), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("b1", 1.0), ("b2", -0.1), ("eps", 0.0), ("weight_decay", -0.01), ("clip_norm", 0.0),
    ("accumulation_steps", 0), ("accumulation_steps", 2.0), ("total_steps", 0),
    ("warmup_steps", -1), ("warmup_steps", 100), ("learning_rate", "1e-4"),
])
def test_bad_config_names_the_field(field, value):
    kwargs = dict(learning_rate=1e-4, warmup_steps=10, total_steps=100)
    kwargs[field] = value
    with pytest.raises(BertJaxError, match=rf"\b{field}="):
        OptimizerConfig(**kwargs)


def test_constant_schedule_allows_warmup_equal_to_total():
    OptimizerConfig(learning_rate=1e-4, warmup_steps=10, total_steps=10, schedule="constant")
    with pytest.raises(BertJaxError, match="warmup_steps="):
        OptimizerConfig(learning_rate=1e-4, warmup_steps=10, total_steps=10)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_non_finite_step_is_skipped(bad):
    """A NaN loss or gradient leaves params and optimizer state as they were (the step
    still counts); a finite one updates them."""
    from bert_jax.training.train_step import TrainState, apply_gradients

    optimizer = build_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0,
                                                total_steps=10, schedule="constant"))
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jnp.zeros(2, jnp.uint32))
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    step = jax.jit(lambda s, loss, g: apply_gradients(s, optimizer, loss, g))

    updated, metrics = step(state, jnp.float32(1.0), grads)
    assert not metrics["skipped"] and int(updated.step) == 1
    assert not np.allclose(updated.params["w"], params["w"])

    loss, bad_grads = jnp.float32(1.0), grads
    if bad == "loss":
        loss = jnp.float32(np.nan)
    else:
        bad_grads = {**grads, "b": jnp.array([1.0, np.inf])}
    skipped, metrics = step(updated, loss, bad_grads)
    assert metrics["skipped"] and int(skipped.step) == 2
    for before, after in zip(jax.tree.leaves((updated.params, updated.opt_state)),
                             jax.tree.leaves((skipped.params, skipped.opt_state))):
        np.testing.assert_array_equal(after, before)
