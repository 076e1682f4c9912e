"""Loaded weights go straight into their shardings and enter the compiled programs as
arguments, never as constants: a program that closes over a model embeds all of it (BERT-large:
1.3 GB of HLO constants, compiled on every process, a whole copy on one device first)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import numpy as np
import optax
from conftest import simulated_devices_env

from bert_jax import sharding
from bert_jax.pretrained import load_config
from bert_jax.training.finetune import FinetuneModel, task_model
from bert_jax.training.pretrain import build_model
from bert_jax.training.recipe import load_recipe
from bert_jax.training.train_step import (
    TrainState,
    make_train_step,
    state_initializer,
)

LIMIT = 64 * 1024
VOCAB = 1024  # the word embeddings (1024 x 32 floats, 128 KiB) are over the limit


def largest_constant(lowered) -> int:
    """Bytes of the largest constant in a lowered program's StableHLO."""
    sizes = [0]
    for dims in re.findall(r"stablehlo\.constant .*?: tensor<([^>]*)>", lowered.as_text()):
        *shape, dtype = dims.split("x")  # e.g. 1024x32xf32, ui64 (a scalar)
        bits = 1 if dtype == "i1" else int(re.sub(r"\D", "", dtype))
        sizes.append(int(np.prod([int(d) for d in shape])) * max(bits // 8, 1))
    return max(sizes)


def batch_for(config, rows=4, length=16):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "labels": ids}


def assert_programs_take_params_as_arguments(config, params, batch):
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    optimizer = optax.adamw(1e-3)
    init = state_initializer(config, optimizer, mesh, fresh=False)
    key = jax.random.key(0)
    assert largest_constant(init.lower(key, params)) <= LIMIT
    state = init(key, jax.tree.map(lambda x: x.copy(), params))
    with jax.set_mesh(mesh):
        assert largest_constant(make_train_step(config, optimizer, mesh).lower(state, batch)) \
            <= LIMIT
    # The check sees a model closed over: the way the state used to be created.
    closed_over = jax.jit(lambda k: TrainState(step=0, params=params, opt_state=None,
                                               rng=jax.random.key_data(k)))
    assert largest_constant(closed_over.lower(key)) > LIMIT


def test_continued_pretraining_programs_hold_no_weights(hf_dir):
    _, path = hf_dir("bert", "ForPreTraining", vocab_size=VOCAB)
    recipe = load_recipe(None, [f"model.init_from={path}", "data.nsp=true"])
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    config, params = build_model(recipe, None, mesh)
    batch = batch_for(config)
    batch["next_sentence_label"] = np.zeros(4, np.int32)
    assert_programs_take_params_as_arguments(config, params, batch)


def test_fine_tuning_programs_hold_no_weights(hf_dir):
    _, path = hf_dir("bert", "ForMaskedLM", vocab_size=VOCAB)
    path = Path(path)
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    prepared = types.SimpleNamespace(num_labels=3, labels=None, problem_type=None)
    config, params = task_model(path, load_config(path), "ForSequenceClassification", prepared,
                                FinetuneModel(init_from=str(path)), 0, mesh)
    batch = batch_for(config)
    batch["labels"] = np.array([0, 1, 2, 0], np.int32)
    assert_programs_take_params_as_arguments(config, params, batch)


PLACEMENT = """
import json, sys
import jax
from bert_jax import sharding
from bert_jax.pretrained import from_pretrained
from bert_jax.convert.families import family_of_config

mesh = sharding.make_mesh(sharding.MeshConfig(1, 16, 1))
model = from_pretrained(sys.argv[1], mesh=mesh)
boxed = family_of_config(model.config).abstract_variables(model.config)["params"]
expected = sharding.param_shardings(boxed, mesh)
report = []
for (path, x), want in zip(jax.tree_util.tree_flatten_with_path(model.params)[0],
                           jax.tree.leaves(expected), strict=True):
    report.append({"name": jax.tree_util.keystr(path), "shape": list(x.shape),
                   "as_rules_say": x.sharding.is_equivalent_to(want, x.ndim),
                   "split": want.shard_shape(x.shape) != x.shape,
                   "largest_shard": max(list(s.data.shape) for s in x.addressable_shards)})
print(json.dumps(report))
"""


def test_loaded_params_are_sharded_on_16_devices(hf_dir):
    """On an FSDP mesh of 16 (simulated) devices every parameter arrives laid out by the
    rules: no device holds a whole copy of a kernel that the mesh divides."""
    _, path = hf_dir("bert", "ForMaskedLM", hidden_size=64)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PLACEMENT), path],
                            env=simulated_devices_env(16), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert all(p["as_rules_say"] for p in report), [p["name"] for p in report
                                                   if not p["as_rules_say"]]
    kernels = [p for p in report if p["split"]]
    assert len(kernels) >= 10
    for p in kernels:
        assert p["largest_shard"] != p["shape"], f"{p['name']}: a whole copy on one device"
