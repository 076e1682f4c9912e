"""`scan_layers=True` (one nn.scan over the layer stack) computes what the unrolled layers do,
reads and writes checkpoints in the unrolled layout and trains to the same losses; GPT-BERT
refuses it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import example_batch, make_hf_model, save_hf_model, transformers
from flax import traverse_util

import bert_jax
from bert_jax import sharding
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.families import BERT, GPT_BERT
from bert_jax.modeling.scan import unstack_layers

RECIPE = Path(__file__).parents[1] / "configs" / "tiny-mlm.yaml"


def flat(params) -> dict:
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def outputs_and_grads(model):
    """(MLM logits, hidden states, gradients in the unrolled layout) on one batch, one jit."""
    batch = {k: np.asarray(v) for k, v in example_batch().items()}
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)

    def loss(params):
        out = model.module.apply({"params": params}, **batch, labels=labels,
                                 output_hidden_states=True)
        return out.loss, (out.logits, out.hidden_states)

    (_, (logits, hidden_states)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        model.params)
    return logits, hidden_states, flat(unstack_layers(grads) if model.config.scan_layers else grads)


@pytest.fixture(scope="module")
def unrolled(tmp_path_factory):
    """model_type -> (HF dir of a tiny 3-layer MLM model, its unrolled outputs_and_grads)."""
    made = {}

    def get(model_type):
        if model_type not in made:
            path = save_hf_model(make_hf_model(model_type, "ForMaskedLM", num_hidden_layers=3),
                                 tmp_path_factory.mktemp(model_type))
            made[model_type] = path, outputs_and_grads(bert_jax.from_pretrained(path))
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type,remat", [("bert", "none"), ("bert", "full"),
                                              ("bert", "dots"), ("megatron-bert", "full")])
def test_scanned_equals_unrolled(unrolled, model_type, remat):
    path, (logits, hidden_states, grads) = unrolled(model_type)
    scanned = bert_jax.from_pretrained(path, scan_layers=True, remat=remat)
    assert "layers" in scanned.params["bert"] and "layer_0" not in scanned.params["bert"]
    got_logits, got_hidden_states, got_grads = outputs_and_grads(scanned)
    np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)
    assert len(got_hidden_states) == len(hidden_states) == 4  # embeddings + 3 layers
    for got, want in zip(got_hidden_states, hidden_states):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got_grads.keys() == grads.keys()
    for key, value in grads.items():
        np.testing.assert_allclose(got_grads[key], value, atol=1e-5, rtol=0, err_msg=key)


def test_checkpoints_keep_the_unrolled_layout(hf_dir, tmp_path):
    """HF and Orbax directories written from a scanned model equal the unrolled path's, bit
    for bit, and load back into either layout; transformers reads the HF one."""
    torch_model, path = hf_dir("megatron-bert", "ForPreTraining", num_hidden_layers=3)
    scanned = bert_jax.from_pretrained(path, scan_layers=True)
    scanned.save_pretrained(tmp_path / "from_scanned")
    bert_jax.from_pretrained(path).save_pretrained(tmp_path / "from_unrolled")
    source = read_state_dict(Path(path))
    written, reference = (read_state_dict(tmp_path / "from_scanned"),
                          read_state_dict(tmp_path / "from_unrolled"))
    assert written.keys() == reference.keys()
    assert all(np.array_equal(written[k], reference[k]) for k in reference)
    assert all(np.array_equal(written[k], source[k]) for k in source if k in written)
    config = json.loads((tmp_path / "from_scanned" / "config.json").read_text())
    assert "scan_layers" not in config and "remat" not in config
    transformers.MegatronBertForPreTraining.from_pretrained(tmp_path / "from_scanned")

    scanned.save_pretrained(tmp_path / "orbax", format="orbax")
    unrolled = bert_jax.from_pretrained(tmp_path / "orbax")
    assert flat(unrolled.params).keys() == flat(bert_jax.from_pretrained(path).params).keys()
    rescanned = bert_jax.from_pretrained(tmp_path / "orbax", scan_layers=True)
    assert flat(rescanned.params).keys() == flat(scanned.params).keys()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rescanned.params),
                                                    jax.tree.leaves(scanned.params)))


def test_stacked_axis_is_named_and_never_sharded():
    config = bert_jax.preset("tiny", scan_layers=True)
    boxed = BERT.abstract_variables(config)["params"]
    kernel = boxed["bert"]["layers"]["attention"]["query"]["kernel"]
    assert kernel.names == ("layers", "embed", "heads", "kv")
    assert kernel.value.shape[0] == config.num_hidden_layers
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1))
    spec = sharding.param_shardings(boxed, mesh)["bert"]["layers"]["attention"]["query"]["kernel"]
    assert spec.spec[0] is None


def test_a_fresh_scanned_model_starts_from_the_unrolled_weights():
    """scan_layers is a layout choice only: a new model's weights are the same numbers."""
    config = bert_jax.preset("tiny")
    scanned = BERT.init_params(dataclasses.replace(config, scan_layers=True), seed=3)
    assert set(scanned["bert"]) >= {"layers"} and "layer_0" not in scanned["bert"]
    unrolled, restacked = flat(BERT.init_params(config, seed=3)), flat(unstack_layers(scanned))
    assert unrolled.keys() == restacked.keys()
    for key, value in unrolled.items():
        np.testing.assert_array_equal(restacked[key], value, err_msg=str(key))


def test_gpt_bert_refuses_scan_layers():
    config = bert_jax.preset("norbert4-tiny", scan_layers=True)
    with pytest.raises(bert_jax.BertJaxError, match="scan_layers=true is not supported for GPT"):
        GPT_BERT.abstract_variables(config)


@pytest.mark.slow
def test_pretraining_scanned_gives_the_same_losses(corpus, tmp_path):
    """Continued pretraining (the same start; dropout off, whose keys differ per layout): the
    scanned run logs the unrolled run's losses, and its exports are the normal HF layout."""
    vocab = json.loads((corpus / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    source = save_hf_model(make_hf_model("bert", "ForMaskedLM", vocab_size=len(vocab),
                                         max_position_embeddings=128, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0), tmp_path / "source")
    losses = {}
    for scan in ("false", "true"):
        run = tmp_path / f"scan_{scan}"
        args = ["pretrain", "--config", str(RECIPE), "--tokenizer", str(corpus / "tok"), "--quiet"]
        for item in (f"data.train={corpus / 'train'}", "data.eval=null",
                     f"train.output_dir={run}", "train.steps=4", "train.log_every=1",
                     "train.save_every=4",
                     "optimizer.total_steps=4", "optimizer.warmup_steps=1",
                     f"model.init_from={source}", "model.preset=null", "data.nsp=false",
                     f"model.scan_layers={scan}",
                     f"train.compilation_cache_dir={tmp_path / 'cache'}"):
            args += ["--set", item]
        assert main(args) == 0
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        losses[scan] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["true"]) == 4
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-5)
    assert any((tmp_path / "cache").iterdir())  # the train step went to the persistent cache

    run = tmp_path / "scan_true"
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    exported, at_end = read_state_dict(tmp_path / "exported"), read_state_dict(run / "hf")
    unrolled_export = read_state_dict(tmp_path / "scan_false" / "hf")
    assert exported.keys() == at_end.keys() == unrolled_export.keys()
    assert all(np.array_equal(exported[k], at_end[k]) for k in at_end)
    transformers.BertForMaskedLM.from_pretrained(run / "hf")
