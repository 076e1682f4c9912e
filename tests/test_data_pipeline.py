"""Grain pretraining pipelines over small ArrayRecord shards written here.

Token ids encode where they come from: token(d, s, j) = 1000 (d + 1) + 10 s + j is token j of
sentence s of document d (which is also the document's index in the shards), so a batch can
be traced back to its documents; ids grow along a document, so contiguous text is increasing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from bert_jax.data.pipeline import bert_pipeline, gpt_bert_pipeline, split_example_id
from bert_jax.data.records import encode_document

PAD, CLS, SEP, MASK, BOS = 0, 1, 2, 3, 4
NUM_DOCS, NUM_SHARDS = 30, 3
VOCAB = 1000 * (NUM_DOCS + 2)
BERT = dict(seed=0, global_batch_size=8, max_seq_length=32, vocab_size=VOCAB, cls_id=CLS,
            sep_id=SEP, pad_id=PAD, mask_id=MASK)
GPT = dict(seed=0, global_batch_size=4, max_seq_length=48, vocab_size=VOCAB, bos_id=BOS,
           pad_id=PAD, mask_id=MASK)


def document(d: int) -> list[list[int]]:
    rng = np.random.default_rng(d)
    sentences = [[1000 * (d + 1) + 10 * s + j for j in range(rng.integers(2, 10))]
                 for s in range(4 + 7 * d % 12)]
    if d == 0:
        sentences[1] = []  # empty sentences are skipped
    return sentences


def doc_of(tokens):
    return np.asarray(tokens) // 1000 - 1


def sentence_of(tokens):
    return np.asarray(tokens) % 1000 // 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root, paths = tmp_path_factory.mktemp("shards"), []
    per_shard = NUM_DOCS // NUM_SHARDS
    for k in range(NUM_SHARDS):
        paths.append(str(root / f"docs-{k}.arrayrecord"))
        writer = ArrayRecordWriter(paths[-1], "group_size:1")
        for d in range(k * per_shard, (k + 1) * per_shard):
            writer.write(encode_document(document(d)))
        writer.close()
    return paths


def bert(shards, **overrides):
    return bert_pipeline(shards, **(BERT | overrides))


def gpt(shards, **overrides):
    return gpt_bert_pipeline(shards, **(GPT | overrides))


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def original(batch) -> np.ndarray:
    """The ids before masking (the labels hold them where a token was chosen)."""
    return np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def check_bert_rows(batch, nsp: bool):
    """[CLS] A [SEP] B [SEP] padding; A contiguous text of the example's document; B its
    continuation (IsNext) or contiguous text of one other document (NotNext)."""
    _, docs, _ = split_example_id(batch["example_id"], NUM_DOCS)
    ids, types, attention = original(batch), batch["token_type_ids"], batch["attention_mask"]
    for row, doc in enumerate(docs):
        n = attention[row].sum()
        assert attention[row, :n].all() and not attention[row, n:].any()
        assert ids[row, 0] == CLS and (ids[row, n:] == PAD).all()
        seps = np.flatnonzero(ids[row, :n] == SEP)
        assert len(seps) == 2 and seps[1] == n - 1
        np.testing.assert_array_equal(types[row], (np.arange(32) > seps[0]) & (np.arange(32) < n))
        a, b = ids[row, 1:seps[0]], ids[row, seps[0] + 1:n - 1]
        assert len(a) and len(b) and (np.diff(a) > 0).all() and (np.diff(b) > 0).all()
        assert (doc_of(a) == doc).all()
        if nsp and batch["next_sentence_label"][row]:
            assert len(set(doc_of(b))) == 1 and doc_of(b[0]) != doc
        else:
            assert (doc_of(b) == doc).all() and sentence_of(a).max() < sentence_of(b).min()
    assert (batch["labels"][np.isin(ids, [CLS, SEP, PAD])] == -100).all()


def test_bert_batch_layout_and_provenance(shards):
    batches = take(bert(shards), 10)
    expected = {"input_ids", "attention_mask", "token_type_ids", "labels",
                "next_sentence_label", "example_id"}
    for batch in batches:
        assert set(batch) == expected
        for key in expected - {"next_sentence_label", "example_id"}:
            assert type(batch[key]) is np.ndarray
            assert batch[key].shape == (8, 32) and batch[key].dtype == np.int32, key
        assert batch["next_sentence_label"].shape == (8,)
        assert batch["next_sentence_label"].dtype == np.int32
        assert batch["example_id"].shape == (8,) and batch["example_id"].dtype == np.int64
        check_bert_rows(batch, nsp=True)
    labels = np.concatenate([b["next_sentence_label"] for b in batches])
    assert 0.3 < labels.mean() < 0.7


def test_bert_without_nsp_pairs_continuations(shards):
    for batch in take(bert(shards, nsp=False), 5):
        assert "next_sentence_label" not in batch
        check_bert_rows(batch, nsp=False)


def test_bert_deterministic_by_seed(shards):
    first, again, other = (take(bert(shards, seed=seed), 5) for seed in (0, 0, 1))
    assert_same_batches(first, again)
    assert not any(np.array_equal(a["example_id"], b["example_id"]) for a, b in zip(first, other))


@pytest.mark.parametrize("k, window", [(0, 1024), (5, 1024), (13, 4)])
def test_bert_resume_continues_exactly(shards, k, window):
    """State after k batches (through JSON, as a checkpoint stores it) into a new pipeline gives
    the batches of the uninterrupted run; 21 batches pass two epoch boundaries."""
    full = take(bert(shards, shuffle_window=window), k + 8)
    stopped = bert(shards, shuffle_window=window)
    take(stopped, k)
    resumed = bert(shards, shuffle_window=window)
    resumed.set_state(json.loads(json.dumps(stopped.get_state())))
    assert_same_batches(take(resumed, 8), full[k:])


def test_gpt_bert_resume_continues_exactly(shards):
    full = take(gpt(shards), 14)
    for k in range(8):  # every k: packing states with and without a document cut across rows
        stopped = gpt(shards)
        take(stopped, k)
        resumed = gpt(shards)
        resumed.set_state(json.loads(json.dumps(stopped.get_state())))
        assert_same_batches(take(resumed, 6), full[k:k + 6])


def test_resume_with_worker_processes(shards):
    full = bert(shards, worker_count=2)
    expected = take(full, 9)
    full.close()
    stopped = bert(shards, worker_count=2)
    take(stopped, 4)
    state = json.loads(json.dumps(stopped.get_state()))
    stopped.close()
    resumed = bert(shards, worker_count=2)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected[4:])
    resumed.close()


@pytest.mark.parametrize("make", [bert, gpt])
def test_processes_split_each_global_batch(shards, make):
    """Two processes get disjoint halves of the single-process global batch, masked the same."""
    single = take(make(shards), 6)
    halves = [take(make(shards, process_index=p, process_count=2), 6) for p in range(2)]
    for whole, parts in zip(single, zip(*halves)):
        rows = dict(zip(whole["example_id"].tolist(), whole["input_ids"]))
        ids = [set(part["example_id"].tolist()) for part in parts]
        assert all(len(part["example_id"]) == len(rows) // 2 for part in parts)
        assert not ids[0] & ids[1] and ids[0] | ids[1] == set(rows)
        for part in parts:
            for example_id, row in zip(part["example_id"].tolist(), part["input_ids"]):
                np.testing.assert_array_equal(row, rows[example_id])


def test_bad_arguments(shards, tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        bert(shards, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        gpt(shards, process_index=2, process_count=2)
    empty = str(tmp_path / "empty.arrayrecord")
    ArrayRecordWriter(empty, "group_size:1").close()
    with pytest.raises(ValueError, match="no documents"):
        bert([empty])


def test_bert_epochs_use_every_document_each_epoch(shards):
    batches = list(bert(shards, global_batch_size=1, num_epochs=2, shuffle_window=1))
    example_ids = np.concatenate([b["example_id"] for b in batches])
    assert len(set(example_ids.tolist())) == len(example_ids)
    epoch, doc, instance = split_example_id(example_ids, NUM_DOCS)
    assert (np.diff(epoch) >= 0).all() and set(epoch.tolist()) == {0, 1}
    orders = []
    for e in (0, 1):
        assert set(doc[epoch == e].tolist()) == set(range(NUM_DOCS))
        for d in range(NUM_DOCS):
            assert sorted(instance[(epoch == e) & (doc == d)]) == list(
                range(((epoch == e) & (doc == d)).sum()))
        orders.append(list(dict.fromkeys(doc[epoch == e].tolist())))
    assert orders[0] != orders[1] and sorted(orders[0]) != orders[0]  # reshuffled each epoch


def test_bert_masking_statistics(shards):
    batches = take(bert(shards, global_batch_size=16, max_seq_length=64), 25)
    labels = np.concatenate([b["labels"] for b in batches])
    ids = np.concatenate([b["input_ids"] for b in batches])
    chosen = labels != -100
    special = np.isin(np.where(chosen, labels, ids), [CLS, SEP, PAD])
    assert not (chosen & special).any()
    assert 0.13 < chosen.sum() / (~special).sum() < 0.17
    assert 0.75 < (ids[chosen] == MASK).mean() < 0.85
    assert 0.05 < (ids[chosen] == labels[chosen]).mean() < 0.15


def test_bert_masked_positions(shards):
    """With max_predictions_per_seq, each batch lists every labelled position of each row."""
    for batch in take(bert(shards, max_predictions_per_seq=6), 5):
        positions = batch["masked_positions"]
        assert positions.shape == (8, 6) and positions.dtype == np.int32
        for row_labels, row_positions in zip(batch["labels"], positions):
            np.testing.assert_array_equal(row_positions[row_positions >= 0],
                                          np.flatnonzero(row_labels != -100))
    assert "masked_positions" not in take(bert(shards), 1)[0]


def test_bert_whole_word_masking(shards):
    """Odd ids continue the word before: a word's pieces are chosen together."""
    for batch in take(bert(shards, whole_word_starts_fn=lambda ids: ids % 2 == 0), 5):
        ids, chosen = original(batch), batch["labels"] != -100
        special = np.isin(ids, [CLS, SEP, PAD])
        continues = (ids[:, 1:] % 2 == 1) & ~special[:, 1:] & ~special[:, :-1]
        assert chosen.any()
        np.testing.assert_array_equal(chosen[:, 1:][continues], chosen[:, :-1][continues])


def test_gpt_bert_rows_packing_and_labels(shards):
    batches = take(gpt(shards, masked_ratio=0.5), 25)
    masked_labelled, masked_tokens = 0, 0
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels", "segment_ids",
                              "position_ids", "causal_rows", "example_id"}
        for key in ("input_ids", "attention_mask", "labels", "segment_ids", "position_ids"):
            assert batch[key].shape == (4, 48) and batch[key].dtype == np.int32, key
        assert batch["causal_rows"].dtype == bool and batch["example_id"].dtype == np.int64
        segments, positions, ids = batch["segment_ids"], batch["position_ids"], original(batch)
        starts = positions == 0
        assert (segments > 0).all() and (batch["attention_mask"] == 1).all()  # full rows
        np.testing.assert_array_equal(segments, np.cumsum(starts, axis=1))
        np.testing.assert_array_equal(positions[:, 1:][~starts[:, 1:]],
                                      positions[:, :-1][~starts[:, 1:]] + 1)
        for row in range(4):
            for s in range(1, segments[row].max() + 1):
                tokens = ids[row, segments[row] == s]
                text = tokens[1:] if tokens[0] == BOS else tokens
                assert len(set(doc_of(text))) <= 1 and (np.diff(text) > 0).all()
        labels, causal = batch["labels"], batch["causal_rows"]
        np.testing.assert_array_equal(labels[causal], np.where(starts, -100, ids)[causal])
        assert not (batch["input_ids"][causal] == MASK).any()
        chosen = (labels != -100)[~causal]
        assert not (chosen & starts[~causal]).any()
        np.testing.assert_array_equal(batch["input_ids"][~causal][~chosen], ids[~causal][~chosen])
        masked_labelled += chosen.sum()
        masked_tokens += (~starts[~causal]).sum()
    causal = np.concatenate([b["causal_rows"] for b in batches])
    assert 0.25 < causal.mean() < 0.75
    assert 0.1 < masked_labelled / masked_tokens < 0.2


def test_gpt_bert_epoch_stream_is_the_shuffled_documents(shards):
    """Undoing the packing of one epoch gives back every document once, in a shuffled order:
    a segment starting with BOS starts a document, one without continues the last."""
    batches = list(gpt(shards, global_batch_size=1, num_epochs=1))
    documents = []
    for batch in batches:
        ids, segments = original(batch)[0], batch["segment_ids"][0]
        for s in range(1, segments.max() + 1):
            tokens = ids[segments == s].tolist()
            if tokens[0] == BOS:
                documents.append(tokens[1:])
            else:
                documents[-1].extend(tokens)
    assert all((batch["segment_ids"] > 0).all() for batch in batches[:-1])  # padding: last row
    order = [int(doc_of(tokens[0])) for tokens in documents]
    assert sorted(order) == list(range(NUM_DOCS)) and order != sorted(order)
    for d, tokens in zip(order, documents):
        assert tokens == [t for sentence in document(d) for t in sentence]
