"""Meshes and shardings: one train step on 1 device equals the same step on 16 simulated CPU
devices (data 2 x fsdp 4 x tensor 2), and bad meshes / batches are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import simulated_devices_env
from flax import traverse_util

import bert_jax
from bert_jax import sharding
from bert_jax.training.checkpointing import TrainCheckpoints
from bert_jax.training.train_step import create_train_state, state_shardings

SCRIPT = Path(__file__).parent / "scripts" / "sharded_step.py"


def run_steps(tmp_path, devices: int, mesh: tuple[int, int, int], *checkpoint_dir):
    out = tmp_path / f"mesh_{'x'.join(map(str, mesh))}.npz"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), *map(str, mesh),
                             *map(str, checkpoint_dir)], env=simulated_devices_env(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.slow
def test_one_device_equals_sixteen(tmp_path):
    single = run_steps(tmp_path, 1, (1, 1, 1))
    sharded = run_steps(tmp_path, 16, (2, 4, 2))
    assert int(single["devices"]) == 1 and int(sharded["devices"]) == 16
    np.testing.assert_allclose(sharded["losses"], single["losses"], atol=1e-5, rtol=0)
    params = [k for k in single.files if "/" in k]
    assert params
    for key in params:
        np.testing.assert_allclose(sharded[key], single[key], atol=1e-5, rtol=0, err_msg=key)
    # Params are really split: each device holds far less than the whole model.
    assert int(sharded["per_device_bytes"]) < int(single["per_device_bytes"]) / 4


@pytest.mark.slow
def test_checkpoint_from_sixteen_devices_restores_on_one(tmp_path):
    """A train state saved sharded over 16 devices restores onto this process's one device."""
    sys.path.insert(0, str(SCRIPT.parent))
    from sharded_step import CONFIG, OPTIMIZER

    saved = run_steps(tmp_path, 16, (2, 4, 2), tmp_path / "ckpt")
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    shapes = jax.eval_shape(lambda: create_train_state(CONFIG, OPTIMIZER, mesh))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, state_shardings(CONFIG, OPTIMIZER, mesh))
    state, record = TrainCheckpoints(tmp_path / "ckpt").restore(2, target)
    assert record == {"mesh": [2, 4, 2]} and int(state.step) == 2
    restored = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    assert restored.keys() == {k for k in saved.files if "/" in k}
    for key, value in restored.items():
        assert np.array_equal(value, saved[key]), key


@pytest.mark.parametrize("mesh,devices,needle", [
    (sharding.MeshConfig(data=3, fsdp=-1), 16, "does not divide 16 devices"),
    (sharding.MeshConfig(data=2, fsdp=4, tensor=4), 16, "needs 32 devices"),
    (sharding.MeshConfig(data=-1, fsdp=-1), 16, "at most one -1"),
    (sharding.MeshConfig(data=0), 16, "must be positive"),
])
def test_bad_mesh(mesh, devices, needle):
    with pytest.raises(bert_jax.BertJaxError, match=needle):
        mesh.shape(devices)


def test_mesh_shape_fills_the_free_axis():
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(16) == (2, 4, 2)


def test_batch_not_divisible():
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    sharding.check_batch_size(7, mesh)  # one device divides anything
    fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
    with pytest.raises(bert_jax.BertJaxError, match="global batch 12 is not divisible"):
        sharding.check_batch_size(12, fake)


def test_every_logical_axis_has_a_rule():
    """No parameter of any family carries a logical name the rules table does not know."""
    import flax.linen as nn

    from bert_jax.convert.families import BERT, GPT_BERT

    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    for family, config in ((BERT, bert_jax.preset("tiny", architectures=("BertForPreTraining",))),
                           (GPT_BERT, bert_jax.preset("norbert4-tiny"))):
        boxed = family.abstract_variables(config)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        names = {n for leaf in leaves for n in leaf.names}
        assert names <= known, names - known
