"""`masked_positions`: the MLM head on the labelled positions only gives transformers' loss
(computed over all positions), the same gradients and the same eval metrics."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import example_batch, run_hf
from flax import traverse_util

import bert_jax
from bert_jax import sharding
from bert_jax.data.masking import mask_tokens, masked_positions
from bert_jax.training.train_step import make_eval_step

MAX_PREDICTIONS = 4


def masked_batch(head: str):
    batch = example_batch()
    special = batch["attention_mask"] == 0
    ids, labels = mask_tokens(batch["input_ids"], special, np.random.default_rng(0),
                              vocab_size=99, mask_token_id=4, mlm_probability=0.3,
                              max_predictions=MAX_PREDICTIONS)
    batch = batch | {"input_ids": ids, "labels": labels}
    if head == "ForPreTraining":
        batch["next_sentence_label"] = np.array([0, 1, 1])
    return batch


def loss_and_grads(model, batch):
    def loss(params):
        return model.module.apply({"params": params}, **batch).loss

    value, grads = jax.value_and_grad(loss)(model.params)
    return float(value), traverse_util.flatten_dict(grads)


@pytest.mark.parametrize("model_type,head", [("bert", "ForMaskedLM"), ("bert", "ForPreTraining"),
                                             ("megatron-bert", "ForMaskedLM")])
def test_masked_positions_give_transformers_loss(hf_dir, model_type, head):
    torch_model, path = hf_dir(model_type, head)
    model = bert_jax.from_pretrained(path)
    batch = masked_batch(head)
    positions = masked_positions(batch["labels"], MAX_PREDICTIONS)
    assert (positions >= 0).sum() == (batch["labels"] != -100).sum() > 3

    reference = run_hf(torch_model, batch)
    loss, grads = loss_and_grads(model, batch)
    loss_at_positions, grads_at_positions = loss_and_grads(model, batch | {"masked_positions":
                                                                           positions})
    np.testing.assert_allclose(loss_at_positions, reference.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(loss_at_positions, loss, rtol=1e-6)
    for key, value in grads.items():
        np.testing.assert_allclose(grads_at_positions[key], value, atol=1e-6, err_msg=str(key))

    out = model(**{k: v for k, v in batch.items() if k != "labels"}, masked_positions=positions)
    logits = out.logits if head == "ForMaskedLM" else out.prediction_logits
    hf_logits = (reference.logits if head == "ForMaskedLM" else reference.prediction_logits).numpy()
    rows, slots = np.nonzero(positions >= 0)
    assert logits.shape == (3, MAX_PREDICTIONS, 99)
    np.testing.assert_allclose(np.asarray(logits)[rows, slots],
                               hf_logits[rows, positions[rows, slots]], atol=1e-5)


def test_eval_metrics_are_the_same(hf_dir):
    _, path = hf_dir("bert", "ForMaskedLM")
    model = bert_jax.from_pretrained(path)
    batch = masked_batch("ForMaskedLM")
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    with jax.set_mesh(mesh):
        evaluate = make_eval_step(model.config, mesh)
        everywhere = evaluate(model.params, batch)
        at_positions = evaluate(model.params, batch | {
            "masked_positions": masked_positions(batch["labels"], MAX_PREDICTIONS)})
    assert everywhere.keys() == at_positions.keys()
    assert int(at_positions["mlm_tokens"]) == (batch["labels"] != -100).sum()
    for key, value in everywhere.items():
        np.testing.assert_allclose(at_positions[key], value, rtol=1e-5, err_msg=key)
