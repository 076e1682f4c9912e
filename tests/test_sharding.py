"""Meshes and shardings: one train step on 1 device equals the same step on 16 simulated CPU
devices (data 2 x fsdp 4 x tensor 2); a padded vocabulary splits over `tensor`; bad meshes,
batches and parameter dimensions a mesh does not divide are refused."""

from __future__ import annotations

import json
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


# On 8 simulated devices (fsdp 2 x tensor 4): a BERT-base-sized vocabulary (30522, which 4 does
# not divide) on a tiny model. Unpadded it is refused; padded to `vocab_multiple(mesh)` (512:
# 30720 rows) the word embedding and the untied MLM decoder and bias split over `tensor`, and
# the sharded padded model gives the one-device unpadded model's loss and logits.
VOCAB_SCRIPT = """
import json, sys, functools, jax, numpy as np
import bert_jax
from bert_jax import sharding
from bert_jax.convert.families import BERT
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
config = bert_jax.preset("tiny", vocab_size=30522, intermediate_size=64, tie_word_embeddings=False)
try:
    sharding.param_shardings(BERT.abstract_variables(config)["params"], mesh)
    refused = ""
except bert_jax.BertJaxError as err:
    refused = str(err)
padded = config.with_vocab_multiple(sharding.vocab_multiple(mesh))
shardings = sharding.param_shardings(BERT.abstract_variables(padded)["params"], mesh)
params = jax.jit(functools.partial(BERT.fresh_params, padded), out_shardings=shardings)(
    jax.random.key(0))
shapes = {name: [list(s.data.shape) for s in x.addressable_shards] for name, x in (
    ("embedding", params["bert"]["embeddings"]["word_embeddings"]["embedding"]),
    ("decoder", params["mlm"]["decoder"]["kernel"]), ("bias", params["mlm"]["bias"]))}
rng = np.random.default_rng(0)
ids = rng.integers(0, 30522, (4, 8)).astype(np.int32)
labels = np.where(rng.random(ids.shape) < 0.5, ids, -100).astype(np.int32)
def run(config, params):
    out = BERT.build_module(config).apply({"params": params}, ids, labels=labels)
    return out.loss, out.logits
with jax.set_mesh(mesh):
    loss, logits = jax.jit(functools.partial(run, padded))(params)
plain = jax.device_put(BERT.unpad_vocab(padded, jax.device_get(params)), jax.devices()[0])
plain_loss, plain_logits = jax.jit(functools.partial(run, config))(plain)
json.dump({"refused": refused, "padded_rows": padded.padded_vocab_size, "shapes": shapes,
           "logits_shape": list(logits.shape), "loss": float(loss), "plain_loss": float(plain_loss),
           "logits_diff": float(np.abs(np.asarray(logits) - np.asarray(plain_logits)).max())},
          open(sys.argv[1], "w"))
"""


def test_padded_vocabulary_splits_over_tensor(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-c", VOCAB_SCRIPT, str(out)],
                          env=simulated_devices_env(8), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "bert/embeddings/word_embeddings/embedding of shape (30522, 32)" in result["refused"]
    assert "mesh data=1 x fsdp=2 x tensor=4" in result["refused"]
    assert "vocab_multiple" in result["refused"]
    assert result["padded_rows"] == 30720  # 512 x 60: 128 rows per tensor shard, times 4
    assert result["shapes"]["embedding"] == [[7680, 16]] * 8  # vocab / 4, hidden / 2
    assert result["shapes"]["decoder"] == [[16, 7680]] * 8
    assert result["shapes"]["bias"] == [[7680]] * 8
    assert result["logits_shape"] == [4, 8, 30522]
    assert result["loss"] == pytest.approx(result["plain_loss"], abs=1e-5)
    assert result["logits_diff"] < 1e-5


def abstract_mesh(data: int, fsdp: int, tensor: int):
    """A mesh of these sizes without the devices: enough for `param_shardings`."""
    return jax.sharding.AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_undivided_dimension_is_refused_unless_replication_is_allowed():
    """The tiny preset's MLP width (37) on tensor=2: an error naming the parameter, its shape
    and the mesh; with `allow_replication` that parameter is whole on every device and the
    rest stays split."""
    from bert_jax.convert.families import BERT

    config = bert_jax.preset("tiny")
    boxed = BERT.abstract_variables(config)["params"]
    mesh = abstract_mesh(2, 2, 2)
    with pytest.raises(bert_jax.BertJaxError) as err:
        sharding.param_shardings(boxed, mesh)
    message = str(err.value)
    assert "parameter bert/layer_0/mlp_in/bias of shape (37,)" in message
    assert "logical axis 'mlp'" in message and "mesh axis 'tensor' of size 2" in message
    assert "mesh data=2 x fsdp=2 x tensor=2" in message
    assert "allow_replication" in message and "\n" not in message
    replicated = sharding.param_shardings(boxed, mesh, allow_replication=True)
    layer = replicated["bert"]["layer_0"]
    assert layer["mlp_in"]["kernel"].spec == jax.P("fsdp", None)
    assert layer["mlp_out"]["kernel"].spec == jax.P(None, "fsdp")
    assert layer["attention"]["query"]["kernel"].spec == jax.P("fsdp", "tensor", None)
    # A mesh that divides every dimension needs no opt-in.
    sharding.param_shardings(BERT.abstract_variables(
        bert_jax.preset("tiny", intermediate_size=48))["params"], mesh)


def test_mesh_config_opts_in_to_replication():
    assert sharding.MeshConfig().allow_replication is False
    assert sharding.MeshConfig(allow_replication=True).shape(4) == (1, 4, 1)


def test_vocab_multiple_follows_the_tensor_axis():
    assert sharding.vocab_multiple(abstract_mesh(2, 4, 1)) == 128
    assert sharding.vocab_multiple(abstract_mesh(1, 2, 4)) == 512


def test_activations_that_do_not_divide_stay_whole():
    """Only parameters refuse: a batch or length the mesh does not split stays replicated."""
    mesh = abstract_mesh(2, 2, 2)
    with jax.sharding.use_abstract_mesh(mesh):
        assert sharding.activation_spec(("batch", "length", "act_embed"), (3, 5, 32)) == jax.P(
            None, None, None)
        assert sharding.activation_spec(("batch", "length", "act_embed"), (8, 5, 32)) == jax.P(
            ("data", "fsdp"), None, None)
