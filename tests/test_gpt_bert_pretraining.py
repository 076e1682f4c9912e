"""GPT-BERT's pretraining model on packed, mixed rows equals the Hub-parity heads run on each
document alone, and its loss is the row-share mix of the two objectives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NORBERT4_TINY

import bert_jax
from bert_jax.modeling import gpt_bert


@pytest.fixture(scope="module")
def models():
    masked = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")
    causal = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm", head="ForCausalLM")
    pretraining = gpt_bert.GptBertForPreTraining(masked.config.with_head("ForPreTraining"))
    return masked, causal, pretraining


def packed_rows(vocab_size: int, lengths=(7, 12, 5), width=30):
    """Two rows: documents of `lengths` packed into the first (then padding), one long one."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, vocab_size, n) for n in lengths]
    input_ids = np.zeros((2, width), np.int32)
    segment_ids = np.zeros((2, width), np.int32)
    position_ids = np.zeros((2, width), np.int32)
    start = 0
    for s, doc in enumerate(docs, 1):
        input_ids[0, start:start + len(doc)] = doc
        segment_ids[0, start:start + len(doc)] = s
        position_ids[0, start:start + len(doc)] = np.arange(len(doc))
        start += len(doc)
    input_ids[1] = rng.integers(5, vocab_size, width)
    segment_ids[1], position_ids[1] = 1, np.arange(width)
    return docs, input_ids, segment_ids, position_ids


@pytest.mark.parametrize("first_row_causal", [False, True])
def test_packed_documents_equal_separate_forwards(models, first_row_causal):
    masked, causal, pretraining = models
    docs, input_ids, segment_ids, position_ids = packed_rows(masked.config.vocab_size)
    causal_rows = np.array([first_row_causal, not first_row_causal])
    out = pretraining.apply({"params": masked.params}, jnp.asarray(input_ids),
                            attention_mask=jnp.asarray(segment_ids > 0),
                            position_ids=jnp.asarray(position_ids),
                            segment_ids=jnp.asarray(segment_ids),
                            causal_rows=jnp.asarray(causal_rows))
    start = 0
    for doc in docs:
        alone = (causal if first_row_causal else masked)(doc[None])
        ours = np.asarray(out.logits[0, start:start + len(doc)])
        if first_row_causal:  # the causal head is unshifted; ours predicts position i at i
            ours, expected = ours[1:], np.asarray(alone.logits[0, :-1])
        else:
            ours, expected = ours[1:], np.asarray(alone.logits[0, 1:])
        np.testing.assert_allclose(ours, expected, atol=1e-4)
        start += len(doc)
    whole = (masked if first_row_causal else causal)(input_ids[1:])
    expected = np.asarray(whole.logits[0, 1:] if first_row_causal else whole.logits[0, :-1])
    np.testing.assert_allclose(np.asarray(out.logits[1, 1:]), expected, atol=1e-4)


def test_loss_mixes_the_objectives_by_row_share(models):
    masked, causal, pretraining = models
    _, input_ids, segment_ids, position_ids = packed_rows(masked.config.vocab_size)
    rows = [input_ids[1:].copy(), input_ids[1:].copy(), input_ids[1:].copy()]
    labels = np.full((3, input_ids.shape[1]), -100, np.int32)
    labels[0, 1:] = rows[0][0, 1:]  # causal row: every token but the first
    labels[1:, 3:20:4] = rows[1][0, 3:20:4]  # masked rows: a few tokens
    ids = np.concatenate(rows)
    ids[1:, 3:20:4] = 4  # any id stands in for the mask token here
    causal_rows = np.array([True, False, False])
    out = pretraining.apply({"params": masked.params}, jnp.asarray(ids),
                            causal_rows=jnp.asarray(causal_rows), labels=jnp.asarray(labels))
    causal_loss = causal(ids[:1], labels=labels[:1]).loss
    masked_loss = masked(ids[1:], labels=labels[1:]).loss
    np.testing.assert_allclose(float(out.loss), float(causal_loss) / 3 + 2 * float(masked_loss) / 3,
                               rtol=1e-5)
