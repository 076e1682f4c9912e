"""Meshes and shardings: one train step on 1 device equals the same step on 16 simulated CPU
devices (data 2 x fsdp 4 x tensor 2), and bad meshes / batches are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bert_jax
from bert_jax import sharding

SCRIPT = Path(__file__).parent / "scripts" / "sharded_step.py"


def run_steps(tmp_path, devices: int, mesh: tuple[int, int, int]):
    out = tmp_path / f"mesh_{'x'.join(map(str, mesh))}.npz"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), *map(str, mesh)], env=env,
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
    import jax

    from bert_jax.families import BERT, GPT_BERT

    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    for family, config in ((BERT, bert_jax.preset("tiny", architectures=("BertForPreTraining",))),
                           (GPT_BERT, bert_jax.preset("norbert4-tiny"))):
        boxed = family.abstract_variables(config)["params"]
        names = {n for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
                 for n in leaf.names}
        assert names <= known, names - known
