"""A vocabulary padded inside the model (`vocab_multiple`): BERT, Megatron-BERT and GPT-BERT
give the unpadded model's outputs and losses (at the real vocabulary size), train the real rows
only, generate the same tokens, and convert to and from HF and Orbax bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NORBERT4_TINY, VOCAB, example_batch, make_hf_model, run_hf, save_hf_model
from flax import traverse_util

import bert_jax
from bert_jax.convert import orbax_dir
from bert_jax.convert.families import BERT, GPT_BERT
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.inference.generate import Sampling, generate

MULTIPLE = 64  # BERT's 99 rows -> 128; GPT-BERT's 256 -> 256 + 64 with MULTIPLE_GPT
MULTIPLE_GPT = 96  # 256 -> 288
# Padded against unpadded: 1e-6, relative where values are large (GPT-BERT's logits reach 30,
# whose fp32 spacing is 2e-6; a wider vocabulary matmul may add in another order).
SAME = dict(atol=1e-6, rtol=1e-6)
TOL = 1e-4  # against transformers / the reference fixture, as tests/test_parity.py


def mlm_labels(batch, seed=1):
    rng = np.random.default_rng(seed)
    keep = (batch["attention_mask"] == 1) & (rng.random(batch["input_ids"].shape) < 0.5)
    return {"labels": np.where(keep, batch["input_ids"], -100)}


def vocab_params(model):
    """The params with a vocabulary axis, and that axis."""
    flat = traverse_util.flatten_dict(model.params)
    family = BERT if model.config.class_prefix != "GptBert" else GPT_BERT
    return {path: (flat[path], axis) for path, axis in family.vocab_axes(model.config).items()}


def assert_padding_rows_zero(model, padded_rows):
    found = vocab_params(model)
    assert found
    for path, (value, axis) in found.items():
        value = np.asarray(value)
        assert value.shape[axis] == padded_rows, path
        real = model.config.vocab_size
        assert not np.any(np.take(value, range(real, padded_rows), axis=axis)), path


@pytest.mark.parametrize("model_type,head,tied", [
    ("bert", "ForPreTraining", True), ("bert", "ForMaskedLM", True),
    ("bert", "ForMaskedLM", False), ("megatron-bert", "ForMaskedLM", True),
    ("megatron-bert", "ForPreTraining", False)])
def test_bert_padded_equals_unpadded_and_transformers(tmp_path, model_type, head, tied):
    torch_model = make_hf_model(model_type, head, tie_word_embeddings=tied)
    path = save_hf_model(torch_model, tmp_path / "hf")
    batch = example_batch(head)
    labels = mlm_labels(batch)
    if head == "ForPreTraining":
        labels["next_sentence_label"] = np.array([0, 1, 1])
    plain = bert_jax.from_pretrained(path)
    padded = bert_jax.from_pretrained(path, vocab_multiple=MULTIPLE)
    assert padded.config.padded_vocab_size == 128 and padded.config.vocab_size == VOCAB
    assert_padding_rows_zero(padded, 128)

    ours, theirs = padded(**batch, **labels, output_hidden_states=True), plain(**batch, **labels)
    hf = run_hf(torch_model, batch, **labels)
    field = "prediction_logits" if head == "ForPreTraining" else "logits"
    logits = np.asarray(getattr(ours, field))
    assert logits.shape == (3, 11, VOCAB)
    np.testing.assert_allclose(logits, np.asarray(getattr(theirs, field)), **SAME)
    real = batch["attention_mask"] == 1
    np.testing.assert_allclose(logits[real], getattr(hf, field).numpy()[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(float(ours.loss), float(theirs.loss), **SAME)
    np.testing.assert_allclose(float(ours.loss), float(hf.loss), atol=TOL, rtol=0)
    for mine, ref in zip(ours.hidden_states, hf.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(mine)[real], ref.numpy()[real], atol=TOL, rtol=0)


def test_masked_positions_padded_equals_unpadded(tmp_path):
    """The pretraining path: logits at the masked positions only, the loss over them."""
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path / "hf")
    batch = example_batch()
    positions = np.array([[1, 3, 5, -1], [0, 2, -1, -1], [4, -1, -1, -1]])
    labels = np.full_like(batch["input_ids"], -100)
    for row, cols in enumerate(positions):
        cols = cols[cols >= 0]
        labels[row, cols] = batch["input_ids"][row, cols]
    outs = [bert_jax.from_pretrained(path, **runtime)(**batch, labels=labels,
                                                      masked_positions=positions)
            for runtime in ({}, {"vocab_multiple": MULTIPLE})]
    assert outs[1].logits.shape == (3, 4, VOCAB)
    np.testing.assert_allclose(np.asarray(outs[1].logits), np.asarray(outs[0].logits), **SAME)
    np.testing.assert_allclose(float(outs[1].loss), float(outs[0].loss), **SAME)


@pytest.mark.parametrize("tied", [True, False])
def test_bert_round_trip_bit_exact(tmp_path, tied):
    """HF -> padded (also scanned) -> HF, and through an Orbax dir that holds the real size:
    the tensors the unpadded model writes, which for a tied model are the file's own. (An
    untied test model's two MLM biases differ, and both are written from the one it reads.)"""
    path = save_hf_model(make_hf_model("bert", "ForPreTraining", tie_word_embeddings=tied),
                         tmp_path / "hf")
    bert_jax.from_pretrained(path).save_pretrained(tmp_path / "unpadded")
    original = read_state_dict(tmp_path / "unpadded")
    if tied:
        assert all(np.array_equal(t, original[k]) for k, t in read_state_dict(Path(path)).items())
    for i, runtime in enumerate(({"vocab_multiple": MULTIPLE},
                                 {"vocab_multiple": MULTIPLE, "scan_layers": True})):
        model = bert_jax.from_pretrained(path, **runtime)
        model.save_pretrained(tmp_path / f"hf{i}")
        model.save_pretrained(tmp_path / f"orbax{i}", format="orbax")
        stored = orbax_dir.params_metadata(tmp_path / f"orbax{i}")
        assert stored[("bert", "embeddings", "word_embeddings", "embedding")][0] == (VOCAB, 32)
        for source in (f"orbax{i}", f"hf{i}"):  # read back padded and unpadded
            bert_jax.from_pretrained(tmp_path / source, **runtime).save_pretrained(
                tmp_path / f"{source}_padded")
            bert_jax.from_pretrained(tmp_path / source).save_pretrained(
                tmp_path / f"{source}_plain")
        for out in (f"hf{i}", f"orbax{i}_padded", f"orbax{i}_plain", f"hf{i}_padded",
                    f"hf{i}_plain"):
            written = read_state_dict(tmp_path / out)
            assert written.keys() == original.keys(), out
            for key, tensor in original.items():
                assert written[key].dtype == tensor.dtype, (out, key)
                assert np.array_equal(written[key], tensor), (out, key)


def test_orbax_dir_read_padded_equals_hf_dir_read_padded(tmp_path):
    path = save_hf_model(make_hf_model("megatron-bert", "ForMaskedLM"), tmp_path / "hf")
    bert_jax.from_pretrained(path).save_pretrained(tmp_path / "orbax", format="orbax")
    a = bert_jax.from_pretrained(path, vocab_multiple=MULTIPLE)
    b = bert_jax.from_pretrained(tmp_path / "orbax", vocab_multiple=MULTIPLE)
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.shape == y.shape and np.array_equal(x, y)


def gpt_bert_outputs(head, **runtime):
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    model = bert_jax.from_pretrained(NORBERT4_TINY / head, **runtime)
    return model, model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=inputs["labels"])


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm"])
def test_gpt_bert_padded_equals_unpadded_and_reference(head):
    mask = np.load(NORBERT4_TINY / "inputs.npz")["attention_mask"] == 1
    expected = np.load(NORBERT4_TINY / "expected_exclusive_window.npz")
    _, plain = gpt_bert_outputs(head)
    model, padded = gpt_bert_outputs(head, vocab_multiple=MULTIPLE_GPT)
    assert model.config.padded_vocab_size == 288
    assert_padding_rows_zero(model, 288)
    logits = np.asarray(padded.logits)
    assert logits.shape == (3, 40, 256)
    np.testing.assert_allclose(logits, np.asarray(plain.logits), **SAME)
    np.testing.assert_allclose(float(padded.loss), float(plain.loss), **SAME)
    np.testing.assert_allclose(logits[mask], expected[f"{head}.logits"][mask], atol=TOL, rtol=0)
    if f"{head}.loss" in expected.files:
        np.testing.assert_allclose(float(padded.loss), expected[f"{head}.loss"], atol=TOL,
                                   rtol=0)


def test_gpt_bert_pretraining_objective_padded_equals_unpadded():
    """The hybrid objective (causal and masked rows in one batch) on padded logits."""
    inputs = np.load(NORBERT4_TINY / "inputs.npz")
    args = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                labels=inputs["labels"], causal_rows=np.array([True, False, True]))
    outs = [bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", head="ForPreTraining",
                                     **runtime)(**args)
            for runtime in ({}, {"vocab_multiple": MULTIPLE_GPT})]
    assert outs[1].logits.shape == (3, 40, 256)
    np.testing.assert_allclose(np.asarray(outs[1].logits), np.asarray(outs[0].logits), **SAME)
    np.testing.assert_allclose(float(outs[1].loss), float(outs[0].loss), **SAME)


def test_gpt_bert_round_trip_bit_exact(tmp_path):
    original = read_state_dict(NORBERT4_TINY / "masked_lm")
    model = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", vocab_multiple=MULTIPLE_GPT)
    model.save_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "orbax", format="orbax")
    bert_jax.from_pretrained(tmp_path / "orbax", vocab_multiple=MULTIPLE_GPT).save_pretrained(
        tmp_path / "via_orbax")
    for out in ("hf", "via_orbax"):
        written = read_state_dict(tmp_path / out)
        assert written.keys() == original.keys()
        for key, tensor in original.items():
            assert np.array_equal(written[key], tensor), (out, key)


def test_generation_with_padding_is_unchanged():
    prompts = [[1, 50, 60, 70, 80], [1] + list(range(10, 21))]
    plain = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")
    padded = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", vocab_multiple=MULTIPLE_GPT)
    greedy = generate(padded, prompts, 12, stop_token_ids=())
    assert greedy == generate(plain, prompts, 12, stop_token_ids=())
    sampled = generate(padded, prompts, 12, sampling=Sampling(do_sample=True, temperature=3.0),
                       stop_token_ids=(), seed=3)  # flat: every real token has weight
    assert all(0 <= t < 256 for row in greedy + sampled for t in row)


def test_padding_rows_get_no_gradient_and_real_rows_the_unpadded_ones(tmp_path):
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path / "hf")
    batch = example_batch()
    labels = mlm_labels(batch)["labels"]

    def grads(model):
        def loss(params):
            return model.module.apply({"params": params}, **batch, labels=labels).loss
        return jax.grad(loss)(model.params)

    plain = bert_jax.from_pretrained(path)
    padded = bert_jax.from_pretrained(path, vocab_multiple=MULTIPLE)
    g_plain, g_padded = grads(plain), grads(padded)
    cut = BERT.unpad_vocab(padded.config, g_padded)
    for a, b in zip(jax.tree.leaves(cut), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **SAME)
    embedding = np.asarray(g_padded["bert"]["embeddings"]["word_embeddings"]["embedding"])
    assert not embedding[VOCAB:].any() and not np.asarray(g_padded["mlm"]["bias"])[VOCAB:].any()


@pytest.mark.parametrize("family,name", [(BERT, "tiny"), (GPT_BERT, "norbert4-tiny")])
def test_fresh_params_are_the_unpadded_ones_padded_with_zeros(family, name):
    """A model trained from scratch starts from the same weights whatever the padding (so a
    run's numbers do not depend on its mesh's `tensor` size)."""
    config = bert_jax.preset(name)
    plain = family.init_params(config, seed=3)
    padded_config = config.with_vocab_multiple(100)
    padded = family.init_params(padded_config, seed=3)
    cut = family.unpad_vocab(padded_config, padded)
    for a, b in zip(jax.tree.leaves(cut), jax.tree.leaves(plain), strict=True):
        assert np.array_equal(a, b)
    axes = family.vocab_axes(padded_config)
    flat = traverse_util.flatten_dict(padded)
    for path, axis in axes.items():
        assert flat[path].shape[axis] == padded_config.padded_vocab_size
        assert not np.take(np.asarray(flat[path]), range(config.vocab_size,
                                                         padded_config.padded_vocab_size),
                           axis=axis).any()


def test_vocab_multiple_is_a_runtime_field():
    config = bert_jax.preset("tiny", vocab_size=30522)
    assert config.padded_vocab_size == 30522
    padded = config.with_vocab_multiple(512)
    assert padded.padded_vocab_size == 30720 and padded.vocab_size == 30522
    assert padded.to_hf_dict() == config.to_hf_dict()  # never written to config.json
    assert "vocab_multiple" not in padded.to_hf_dict()
    assert dataclasses.replace(padded, vocab_multiple=30522).padded_vocab_size == 30522
    for bad in (0, -128, 1.5, True):
        with pytest.raises(bert_jax.BertJaxError, match="vocab_multiple must be a positive"):
            config.with_vocab_multiple(bad)


def test_padded_logits_are_masked():
    """Inside the model the padding columns sit at the fp32 minimum: no softmax weight."""
    from bert_jax.modeling.heads import mask_padded_vocab, real_vocab

    logits = jnp.arange(12.0).reshape(2, 6)
    masked = mask_padded_vocab(logits, 4)
    assert np.all(np.asarray(masked[:, 4:]) == np.finfo(np.float32).min)
    np.testing.assert_array_equal(np.asarray(real_vocab(masked, 4)), np.asarray(logits[:, :4]))
    probs = np.asarray(jax.nn.softmax(masked))
    assert not probs[:, 4:].any() and np.allclose(probs.sum(-1), 1)
    assert mask_padded_vocab(logits, 6) is logits and real_vocab(logits, 6) is logits
