"""bert_jax against `transformers` PyTorch on the CPU in fp32: every head, BERT and Megatron-BERT,
both directions of conversion, with padding and token types in the batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import HEADS, example_batch, make_hf_model, run_hf, save_hf_model, torch, transformers

import bert_jax
from bert_jax.convert.families import BERT
from bert_jax.convert.weight_files import read_state_dict

TOL = 1e-4
OUTPUT_FIELDS = ("logits", "prediction_logits", "seq_relationship_logits", "start_logits",
                 "end_logits", "last_hidden_state", "pooler_output", "loss")


def labels_for(head: str, batch: dict, seed: int = 1) -> dict:
    """Labels of the kind each head takes, with ignored (-100) and out-of-range entries."""
    rng = np.random.default_rng(seed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0]
    token_labels = np.where((mask == 1) & (rng.random(ids.shape) < 0.5),
                            rng.integers(0, 3, ids.shape), -100)
    if head == "ForMaskedLM":
        return {"labels": np.where(token_labels >= 0, ids, -100)}
    if head == "ForPreTraining":
        return {"labels": np.where(token_labels >= 0, ids, -100),
                "next_sentence_label": rng.integers(0, 2, n)}
    if head in ("ForNextSentencePrediction", "ForMultipleChoice"):
        return {"labels": rng.integers(0, 2, n)}
    if head == "ForSequenceClassification":
        return {"labels": rng.integers(0, 3, n)}
    if head == "ForTokenClassification":
        return {"labels": token_labels}
    if head == "ForQuestionAnswering":
        start = rng.integers(0, ids.shape[1], n)
        start[0] = 10_000  # beyond the sequence: clamped and ignored, as in transformers
        return {"start_positions": start, "end_positions": np.minimum(start + 2, ids.shape[1] - 1)}
    return {}


def assert_outputs_match(hf_out, jax_out, mask):
    """Every output field present in both, on the non-padded positions."""
    compared = 0
    for name in OUTPUT_FIELDS:
        ref = getattr(hf_out, name, None)
        if ref is None:
            continue
        ref, ours = ref.numpy(), np.asarray(getattr(jax_out, name))
        assert ours.shape == ref.shape, name
        if ref.ndim >= mask.ndim and ref.shape[: mask.ndim] == mask.shape:
            ref, ours = ref[mask == 1], ours[mask == 1]
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=name)
        compared += 1
    for i, (ref, ours) in enumerate(zip(hf_out.hidden_states, jax_out.hidden_states, strict=True)):
        np.testing.assert_allclose(np.asarray(ours)[mask.reshape(-1, mask.shape[-1]) == 1],
                                   ref.numpy()[mask.reshape(-1, mask.shape[-1]) == 1],
                                   atol=TOL, rtol=0, err_msg=f"hidden_states[{i}]")
    assert compared >= 1


@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
@pytest.mark.parametrize("head", HEADS)
def test_hf_to_bert_jax(tmp_path, model_type, head):
    """A checkpoint saved by transformers gives the same outputs and losses in bert_jax."""
    torch_model = make_hf_model(model_type, head)
    path = save_hf_model(torch_model, tmp_path / "hf")
    batch = example_batch(head)
    labels = labels_for(head, batch)
    model = bert_jax.from_pretrained(path)
    assert model.config.architecture == type(torch_model).__name__
    assert_outputs_match(run_hf(torch_model, batch, **labels),
                         model(**batch, **labels, output_hidden_states=True),
                         batch["attention_mask"])


def _perturbed(params, seed=0):
    """Random offsets on every param, so LayerNorm scale/bias mix-ups cannot pass unnoticed."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
@pytest.mark.parametrize("head", HEADS)
def test_bert_jax_to_hf(tmp_path, model_type, head):
    """A model made in bert_jax, saved with save_pretrained, loads in stock transformers
    (the class its config names) and computes the same outputs."""
    prefix = "MegatronBert" if model_type == "megatron-bert" else "Bert"
    config = bert_jax.preset("tiny", model_type=model_type, architectures=(prefix + head,),
                             labels=None if head == "ForQuestionAnswering" else ("a", "b", "c"))
    model = bert_jax.PretrainedModel(config, _perturbed(BERT.init_params(config, seed=3)))
    model.save_pretrained(tmp_path / "out")
    torch_model = getattr(transformers, prefix + head).from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    expected = ({0: "a", 1: "b", 2: "c"} if head != "ForQuestionAnswering"
                else {0: "LABEL_0", 1: "LABEL_1"})
    assert torch_model.config.id2label == expected
    batch = example_batch(head, seed=2)
    batch["input_ids"] = batch["input_ids"] % config.vocab_size
    labels = labels_for(head, batch)
    assert_outputs_match(run_hf(torch_model, batch, **labels),
                         model(**batch, **labels, output_hidden_states=True),
                         batch["attention_mask"])


@pytest.mark.parametrize("problem_type,num_labels", [
    ("regression", 1), ("multi_label_classification", 3), ("single_label_classification", 3)])
def test_sequence_classification_losses(tmp_path, problem_type, num_labels):
    """Regression (MSE), multi-label (BCE) and single-label (CE) losses as transformers."""
    torch_model = make_hf_model("bert", "ForSequenceClassification", num_labels=num_labels,
                                problem_type=problem_type)
    path = save_hf_model(torch_model, tmp_path / "hf")
    batch = example_batch()
    rng = np.random.default_rng(0)
    labels = {"regression": rng.normal(size=3).astype(np.float32),
              "multi_label_classification": rng.integers(0, 2, (3, 3)).astype(np.float32),
              "single_label_classification": rng.integers(0, 3, 3)}[problem_type]
    ref = run_hf(torch_model, batch, labels=labels)
    ours = bert_jax.from_pretrained(path)(**batch, labels=labels)
    np.testing.assert_allclose(np.asarray(ours.loss), ref.loss.numpy(), atol=TOL)


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_hidden_act_honoured(tmp_path, hidden_act):
    """Megatron conversions use "gelu_new" (tanh GELU) too; the config's choice is followed."""
    torch_model = make_hf_model("megatron-bert", "ForMaskedLM", hidden_act=hidden_act)
    path = save_hf_model(torch_model, tmp_path / "hf")
    model = bert_jax.from_pretrained(path)
    assert model.config.hidden_act == hidden_act
    batch = example_batch()
    assert_outputs_match(run_hf(torch_model, batch), model(**batch, output_hidden_states=True),
                         batch["attention_mask"])


@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
@pytest.mark.parametrize("head", ["ForPreTraining", "ForQuestionAnswering"])
def test_round_trip_bit_identical(tmp_path, model_type, head):
    """HF dir -> bert_jax -> HF dir, and through Orbax, reproduces every tensor exactly."""
    path = save_hf_model(make_hf_model(model_type, head), tmp_path / "hf")
    model = bert_jax.from_pretrained(path)
    model.save_pretrained(tmp_path / "back")
    model.save_pretrained(tmp_path / "orbax", format="orbax")
    bert_jax.from_pretrained(tmp_path / "orbax").save_pretrained(tmp_path / "via_orbax")
    original = read_state_dict(tmp_path / "hf")
    for out in ("back", "via_orbax"):
        written = read_state_dict(tmp_path / out)
        assert written.keys() == original.keys()
        for key, tensor in original.items():
            assert written[key].dtype == tensor.dtype, key
            assert np.array_equal(written[key], tensor), key


def test_bfloat16_round_trip_keeps_dtype(tmp_path):
    """A bf16 checkpoint comes back in bf16, bit-identical (computation runs on fp32 params)."""
    torch_model = make_hf_model("bert", "ForMaskedLM").to(torch.bfloat16)
    path = save_hf_model(torch_model, tmp_path / "hf")
    bert_jax.from_pretrained(path).save_pretrained(tmp_path / "back")
    original, written = read_state_dict(tmp_path / "hf"), read_state_dict(tmp_path / "back")
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype, key
        assert np.array_equal(written[key].view(np.uint16), tensor.view(np.uint16)), key


def test_bfloat16_compute_close_to_float32(tmp_path):
    """dtype="bfloat16" runs the matmuls in bf16 on fp32 params; logits stay close."""
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path / "hf")
    batch = example_batch()
    fp32 = bert_jax.from_pretrained(path)(**batch).logits
    model = bert_jax.from_pretrained(path, dtype="bfloat16")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(model.params))
    bf16 = model(**batch).logits
    assert bf16.dtype == np.float32  # logits are computed in fp32
    mask = batch["attention_mask"] == 1
    diff = np.abs(np.asarray(bf16) - np.asarray(fp32))[mask].max()
    assert 0 < diff < 0.1


def test_bad_host_inputs_are_named_and_device_inputs_stay_on_the_device(hf_dir, monkeypatch):
    """NumPy inputs are checked before they reach JAX (which would clamp bad ids silently);
    device arrays are not read back to the host (no copy and wait per call) and give the same
    logits."""
    _, path = hf_dir()
    model = bert_jax.from_pretrained(path)
    ids = np.array([[2, 5, 7, 3]])
    vocab, (limit_field, limit) = model.config.vocab_size, model.config.max_length
    with pytest.raises(bert_jax.BertJaxError, match=rf"input_ids contains {vocab}, outside "
                                                    rf"\[0, {vocab}\) \(vocab_size"):
        model(np.array([[2, vocab]]))
    with pytest.raises(bert_jax.BertJaxError, match=r"token_type_ids contains -1, outside"):
        model(ids, token_type_ids=np.array([[0, 0, -1, 0]]))
    with pytest.raises(bert_jax.BertJaxError, match="input_ids must be integers"):
        model(ids.astype(np.float32))
    with pytest.raises(bert_jax.BertJaxError, match=f"{limit + 1} tokens, more than {limit_field}"):
        model(np.zeros((1, limit + 1), np.int32))

    expected = np.asarray(model(ids).logits)
    device_ids = jax.device_put(ids)
    to_numpy = np.asarray

    def host_only(x, *args, **kwargs):  # (the CPU backend has no transfer guard to trip)
        assert not isinstance(x, jax.Array), "a device input was read back to the host"
        return to_numpy(x, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(np, "asarray", host_only)
        logits = model(device_ids, jax.numpy.ones_like(device_ids)).logits
    # An explicit all-ones mask is another traced program than no mask: equal up to fp32
    # rounding (XLA may fuse and order the sums differently), not bit for bit.
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-6)
