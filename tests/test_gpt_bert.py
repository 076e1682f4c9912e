"""GPT-BERT (NorBERT 4) against the reference outputs in tests/fixtures/norbert4-tiny, its
conversion both ways, and its bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import NORBERT4_TINY
from safetensors.numpy import save_file

import bert_jax
from bert_jax.convert.families import GPT_BERT
from bert_jax.convert.weight_files import read_state_dict

HEAD_DIRS = ("base", "masked_lm", "causal_lm", "sequence_classification", "token_classification",
             "question_answering")
TOL = 1e-4



def fixture_outputs(window_rule: str, expected_rule: str, **runtime):
    """(key, ours, expected) on non-padded positions for every key of an expected_*.npz."""
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    mask = inputs["attention_mask"]
    expected = np.load(NORBERT4_TINY / f"expected_{expected_rule}_window.npz")
    models = {}
    for key in expected.files:
        head, field = key.split(".")
        if head not in models:
            models[head] = bert_jax.from_pretrained(NORBERT4_TINY / head, window_rule=window_rule,
                                                    **runtime)
        labels = {"labels": inputs["labels"]} if field == "loss" else {}
        ours = np.asarray(getattr(models[head](inputs["input_ids"], attention_mask=mask, **labels),
                                  field))
        ref = expected[key]
        if ref.ndim >= 2 and ref.shape[:2] == mask.shape:
            ours, ref = ours[mask == 1], ref[mask == 1]
        yield key, ours, ref


@pytest.mark.parametrize("rule,scan_layers", [("exclusive", False), ("inclusive", False),
                                              ("exclusive", True)])
def test_fixture_parity(rule, scan_layers):
    """Every key of expected_<rule>_window.npz within 1e-4 (fp32, CPU), also with the layers
    in one nn.scan (the fixture's 4 layers are one scan step of local_global_ratio 4)."""
    keys = []
    for key, ours, ref in fixture_outputs(rule, rule, scan_layers=scan_layers):
        assert ours.shape == ref.shape, key
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=key)
        keys.append(key)
    assert len(keys) == 10


def test_window_rule_matters_on_the_fixture():
    """The two rules give different outputs: the parity test above can tell them apart."""
    worst = max(float(np.abs(ours - ref).max())
                for _, ours, ref in fixture_outputs("inclusive", "exclusive"))
    assert worst > 1e-3


def test_default_window_rule_is_exclusive():
    assert bert_jax.from_pretrained(NORBERT4_TINY / "base").config.window_rule == "exclusive"


def test_masked_lm_output_layout():
    """Position 0 is the one-hot BOS, every other value is bounded in (0, 30)."""
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    model = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")
    logits = np.asarray(model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits)
    bos = model.config.bos_token_id
    np.testing.assert_array_equal(logits[:, 0], np.eye(model.config.vocab_size)[[bos] * 3])
    assert (logits[:, 1:] > 0).all() and (logits[:, 1:] < 30).all()


@pytest.mark.parametrize("head", HEAD_DIRS)
def test_round_trip_bit_identical(tmp_path, head):
    """Fixture dir -> bert_jax -> HF dir (and through Orbax): every tensor identical, and the
    written config keeps every key plus an auto_map for the Hub code."""
    model = bert_jax.from_pretrained(NORBERT4_TINY / head)
    model.save_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "orbax", format="orbax")
    bert_jax.from_pretrained(tmp_path / "orbax").save_pretrained(tmp_path / "via_orbax")
    original = read_state_dict(NORBERT4_TINY / head)
    for out in ("hf", "via_orbax"):
        written = read_state_dict(tmp_path / out)
        assert written.keys() == original.keys()
        for key, tensor in original.items():
            assert written[key].dtype == tensor.dtype and np.array_equal(written[key], tensor), key
    source = json.loads((NORBERT4_TINY / head / "config.json").read_text())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in source.items():
        if key not in ("id2label", "label2id"):
            assert config[key] == value, key
    arch = source["architectures"][0].removeprefix("GptBert")
    auto_key = "AutoModel" if arch == "Model" else f"AutoModel{arch}"
    assert config["auto_map"][auto_key].endswith(f"modeling_gptbert.{source['architectures'][0]}")
    assert "model_type" not in config


def test_output_embedding_falls_back_to_input_embedding(tmp_path):
    """A checkpoint that stores the tied output matrix once uses the word embedding, and
    export writes both keys."""
    shutil.copytree(NORBERT4_TINY / "masked_lm", tmp_path / "tied")
    tensors = read_state_dict(tmp_path / "tied")
    del tensors["classifier.emb2vocab.weight"]
    save_file(tensors, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    model = bert_jax.from_pretrained(tmp_path / "tied")
    kernel = np.asarray(model.params["classifier"]["emb2vocab"]["kernel"])
    np.testing.assert_array_equal(kernel, tensors["embedding.word_embedding.weight"].T)
    model.save_pretrained(tmp_path / "out")
    written = read_state_dict(tmp_path / "out")
    np.testing.assert_array_equal(written["classifier.emb2vocab.weight"],
                                  written["embedding.word_embedding.weight"])


def test_classifier_on_a_pretrained_encoder(caplog):
    """A masked-LM checkpoint loaded with a classification head: encoder weights kept, the
    output projection newly initialised with a warning, the LM layer ignored."""
    model = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", head="ForSequenceClassification",
                                     num_labels=4)
    assert model.config.architecture == "GptBertForSequenceClassification"
    assert "classifier.output_projection.weight" in caplog.text
    assert model.params["classifier"]["output_projection"]["kernel"].shape == (64, 4)
    base = bert_jax.from_pretrained(NORBERT4_TINY / "base")
    np.testing.assert_array_equal(model.params["model"]["layer_2"]["lambdas"],
                                  base.params["model"]["layer_2"]["lambdas"])


@pytest.mark.parametrize("name,millions", [
    ("norbert4-xsmall", 17.02), ("norbert4-small", 40.76), ("norbert4-base", 149.36),
    ("norbert4-large", 360.02), ("norbert4-xlarge", 987.45)])
def test_presets_match_published_sizes(name, millions):
    """Parameters of the masked LM less the separately stored output matrix equal the
    model-card sizes as docs/architectures.md 1.2 computes them."""
    config = bert_jax.preset(name)
    abstract = nn.meta.unbox(GPT_BERT.abstract_variables(config)["params"])
    total = sum(x.size for x in jax.tree.leaves(abstract))
    unique = total - config.vocab_size * config.hidden_size
    assert round(unique / 1e6, 2) == millions


def _copy_with(tmp_path, change_config=None, change_tensors=None) -> Path:
    target = tmp_path / "model"
    shutil.copytree(NORBERT4_TINY / "masked_lm", target)
    if change_config:
        config = json.loads((target / "config.json").read_text())
        change_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if change_tensors:
        tensors = read_state_dict(target)
        change_tensors(tensors)
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _hplt_variant(tensors):
    for key in [k for k in tensors if k.endswith(".lambdas") and ".attention." not in k]:
        layer = key.removesuffix(".lambdas")
        del tensors[key]
        tensors[f"{layer}.lambdas_v"] = np.zeros(2, np.float32)


def test_hplt_variant_is_refused(tmp_path):
    path = _copy_with(tmp_path, change_tensors=_hplt_variant)
    with pytest.raises(bert_jax.BertJaxError, match="HPLT 3.0 GPT-BERT variant") as info:
        bert_jax.from_pretrained(path)
    assert "model.safetensors" in str(info.value)


def test_config_missing_key(tmp_path):
    path = _copy_with(tmp_path, change_config=lambda c: c.pop("local_window_length"))
    with pytest.raises(bert_jax.BertJaxError,
                       match="config.json: missing key 'local_window_length'"):
        bert_jax.from_pretrained(path)


def test_sequence_longer_than_max_sequence_length():
    model = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")
    with pytest.raises(bert_jax.BertJaxError, match="max_sequence_length=256"):
        model(np.ones((1, 257), np.int32))


def test_multiple_choice_pools_position_zero():
    """Each choice is scored as a one-label sequence classifier would score it alone."""
    choice = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", head="ForMultipleChoice")
    single = bert_jax.PretrainedModel(
        choice.config.with_head("ForSequenceClassification", num_labels=1), choice.params)
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logits = np.asarray(choice(ids[None], attention_mask=mask[None]).logits)
    assert logits.shape == (1, 3)
    expected = np.asarray(single(ids, attention_mask=mask).logits)[:, 0]
    np.testing.assert_allclose(logits[0], expected, atol=1e-6)


def test_pytorch_bin_checkpoint(tmp_path):
    """NorBERT 4 xlarge ships only pytorch_model.bin: read through torch.load(weights_only)."""
    torch = pytest.importorskip("torch")
    target = tmp_path / "bin"
    target.mkdir()
    shutil.copy(NORBERT4_TINY / "masked_lm" / "config.json", target)
    tensors = read_state_dict(NORBERT4_TINY / "masked_lm")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, target / "pytorch_model.bin")
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    ours = bert_jax.from_pretrained(target)(inputs["input_ids"]).logits
    ref = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")(inputs["input_ids"]).logits
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
