"""`scan_layers=True` (one nn.scan over the layer stack) computes what the unrolled layers do,
reads and writes checkpoints in the unrolled layout and trains to the same losses; GPT-BERT
scans groups of local_global_ratio layers."""

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
from bert_jax.convert.families import BERT, GPT_BERT
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.inference.generate import generate
from bert_jax.modeling.gpt_bert import init_cache
from bert_jax.modeling.scan import unstack_layers

CONFIGS = Path(__file__).parents[1] / "configs"


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


@pytest.fixture(scope="module")
def gpt_bert_dir(tmp_path_factory):
    """A tiny NorBERT 4 masked LM of 8 layers: two scan steps of 3 local layers and a global."""
    config = dataclasses.replace(bert_jax.preset("norbert4-tiny"), num_layers=8)
    path = tmp_path_factory.mktemp("norbert4")
    bert_jax.PretrainedModel(config, GPT_BERT.init_params(config, seed=2)).save_pretrained(path)
    return path


def gpt_bert_outputs_and_grads(model):
    """(logits, hidden states, unrolled gradients) of the MLM loss on padded rows of 40 tokens,
    longer than the local window (8) and the global one (24)."""
    batch = example_batch(length=40)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)

    def loss(params):
        out = model.module.apply({"params": params}, **inputs, labels=labels,
                                 output_hidden_states=True)
        return out.loss, (out.logits, out.hidden_states)

    (_, (logits, hidden_states)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        model.params)
    return logits, hidden_states, flat(unstack_layers(grads) if model.config.scan_layers else grads)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_gpt_bert_scanned_equals_unrolled(gpt_bert_dir, remat):
    """Scanned in groups of local_global_ratio layers (windows and RoPE thetas static per
    group member, the first layer's value residual a run-time flag), GPT-BERT computes what
    its unrolled layers do, gradients included."""
    model = bert_jax.from_pretrained(gpt_bert_dir)
    logits, hidden_states, grads = gpt_bert_outputs_and_grads(model)
    scanned = bert_jax.from_pretrained(gpt_bert_dir, scan_layers=True, remat=remat)
    layers = scanned.params["model"]["layers"]
    assert sorted(layers) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert layers["layer_3"]["attention"]["qk_proj"]["query"].shape[0] == 2  # stacked over steps
    got_logits, got_hidden_states, got_grads = gpt_bert_outputs_and_grads(scanned)
    np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)
    assert len(got_hidden_states) == len(hidden_states) == 9  # embeddings + 8 layers
    for got, want in zip(got_hidden_states, hidden_states):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert got_grads.keys() == grads.keys()
    for key, value in grads.items():
        np.testing.assert_allclose(got_grads[key], value, atol=1e-5, rtol=1e-4, err_msg=key)


def test_gpt_bert_scanned_checkpoints_and_generation(gpt_bert_dir, tmp_path):
    """A scanned GPT-BERT writes the files the unrolled one does, and generates the same
    tokens (decoding unrolls it: the cache is per layer)."""
    unrolled = bert_jax.from_pretrained(gpt_bert_dir)
    scanned = bert_jax.from_pretrained(gpt_bert_dir, scan_layers=True)
    scanned.save_pretrained(tmp_path / "from_scanned")
    written, source = read_state_dict(tmp_path / "from_scanned"), read_state_dict(gpt_bert_dir)
    assert written.keys() == source.keys()
    assert all(np.array_equal(written[k], source[k]) for k in source)
    scanned.save_pretrained(tmp_path / "orbax", format="orbax")
    rescanned = bert_jax.from_pretrained(tmp_path / "orbax", scan_layers=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rescanned.params),
                                                    jax.tree.leaves(scanned.params)))

    prompts = [[1, 17, 42, 99], [1, 5, 6]]
    assert generate(scanned, prompts, max_new_tokens=6) == generate(unrolled, prompts,
                                                                     max_new_tokens=6)
    with pytest.raises(bert_jax.BertJaxError, match="past_key_values needs the unrolled layers"):
        causal = scanned.config.with_head("ForCausalLM")
        GPT_BERT.build_module(causal).apply({"params": scanned.params}, np.ones((1, 3), np.int32),
                                            position_ids=np.arange(3)[None],
                                            past_key_values=init_cache(causal, 1, 8))


def test_gpt_bert_scan_needs_whole_groups():
    with pytest.raises(bert_jax.BertJaxError,
                       match=r"num_layers \(6\) to be a multiple of local_global_ratio \(4\)"):
        dataclasses.replace(bert_jax.preset("norbert4-tiny"), num_layers=6, scan_layers=True)
    # shapes for checkpoint checks still come from the unrolled model
    config = dataclasses.replace(bert_jax.preset("norbert4-tiny"), num_layers=6)
    assert "layer_5" in GPT_BERT.unrolled_abstract_params(config)["model"]


def pretrain_losses(recipe: str, corpus: Path, run: Path, scan: str, *overrides: str) -> list:
    """The logged losses of 4 pretraining steps of `configs/<recipe>` with `model.scan_layers`."""
    args = ["pretrain", "--config", str(CONFIGS / recipe), "--tokenizer", str(corpus / "tok"),
            "--quiet"]
    for item in (f"data.train={corpus / 'train'}", "data.eval=null", f"train.output_dir={run}",
                 "train.steps=4", "train.log_every=1", "train.save_every=4",
                 "optimizer.total_steps=4", "optimizer.warmup_steps=1",
                 f"model.scan_layers={scan}", *overrides):
        args += ["--set", item]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_pretraining_scanned_gives_the_same_losses(corpus, tmp_path):
    """Continued pretraining (the same start; dropout off, whose keys differ per layout): the
    scanned run logs the unrolled run's losses, and its exports are the normal HF layout."""
    vocab = json.loads((corpus / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    source = save_hf_model(make_hf_model("bert", "ForMaskedLM", vocab_size=len(vocab),
                                         max_position_embeddings=128, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0), tmp_path / "source")
    losses = {scan: pretrain_losses("tiny-mlm.yaml", corpus, tmp_path / f"scan_{scan}", scan,
                                    f"model.init_from={source}", "model.preset=null",
                                    "data.nsp=false",
                                    f"train.compilation_cache_dir={tmp_path / 'cache'}")
              for scan in ("false", "true")}
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


@pytest.mark.slow
def test_gpt_bert_pretraining_scanned_gives_the_same_losses(corpus, tmp_path):
    """NorBERT 4 tiny from scratch: a fresh scanned model starts from the unrolled weights, and
    trains to the same losses (its only dropout, on the embedding, sits outside the layers)."""
    losses = {scan: pretrain_losses("tiny-norbert4-mlm.yaml", corpus, tmp_path / f"scan_{scan}",
                                    scan, "data.max_seq_length=32", "data.global_batch_size=8")
              for scan in ("false", "true")}
    assert len(losses["true"]) == 4
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-5)
    assert read_state_dict(tmp_path / "scan_true" / "hf").keys() == read_state_dict(
        tmp_path / "scan_false" / "hf").keys()
