"""Host-side pretraining examples: MLM masking, span masking, NSP instances."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.data.masking import mask_tokens, masked_positions, span_mask
from bert_jax.data.nsp import IS_NEXT, NOT_NEXT, nsp_instances

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000


def padded_batch(B=512, T=128, seed=0):
    """[CLS] tokens [SEP] then padding, random lengths; ids and special mask [B, T]."""
    rng = np.random.default_rng(seed)
    lengths_B = rng.integers(T // 4, T - 1, B)
    ids = rng.integers(5, VOCAB, (B, T))
    ids[:, 0] = CLS
    ids[np.arange(B), lengths_B + 1] = SEP
    ids[np.arange(T) > (lengths_B + 1)[:, None]] = PAD
    return ids, np.isin(ids, [PAD, CLS, SEP])


def masked_stats(ids, special, masked, labels):
    chosen = labels != -100
    return {"rate": chosen.sum() / (~special).sum(),
            "mask": (masked[chosen] == MASK).mean(),
            "random": ((masked[chosen] != MASK) & (masked[chosen] != ids[chosen])).mean(),
            "kept": (masked[chosen] == ids[chosen]).mean()}


def check_labels(ids, special, masked, labels):
    chosen = labels != -100
    assert not (chosen & special).any(), "a special position was chosen"
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])


def test_mask_tokens_rates_and_labels():
    ids, special = padded_batch()
    masked, labels = mask_tokens(ids, special, np.random.default_rng(1), vocab_size=VOCAB,
                                 mask_token_id=MASK)
    check_labels(ids, special, masked, labels)
    stats = masked_stats(ids, special, masked, labels)
    assert abs(stats["rate"] - 0.15) < 0.01
    # A random replacement may draw the original id (1/VOCAB): counted as kept here.
    for key, expected in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(stats[key] - expected) < 0.02, (key, stats)
    assert masked.shape == ids.shape and masked.dtype == ids.dtype


def test_mask_tokens_one_sequence_and_max_predictions():
    ids, special = padded_batch(B=64, T=256)
    _, labels = mask_tokens(ids, special, np.random.default_rng(0), vocab_size=VOCAB,
                            mask_token_id=MASK, max_predictions=20)
    count_B = (labels != -100).sum(axis=1)
    expected_B = np.minimum(20, np.maximum(1, np.rint(0.15 * (~special).sum(axis=1))))
    np.testing.assert_array_equal(count_B, expected_B)
    masked, labels = mask_tokens(ids[3], special[3], np.random.default_rng(0),
                                 vocab_size=VOCAB, mask_token_id=MASK, max_predictions=5)
    assert masked.shape == ids[3].shape and (labels != -100).sum() == 5
    check_labels(ids[3], special[3], masked, labels)
    # nothing to choose: nothing chosen
    _, labels = mask_tokens(ids[:2], np.ones_like(special[:2]), np.random.default_rng(0),
                            vocab_size=VOCAB, mask_token_id=MASK)
    assert (labels == -100).all()


def test_mask_tokens_deterministic():
    ids, special = padded_batch(B=8)
    kwargs = dict(vocab_size=VOCAB, mask_token_id=MASK)
    a = mask_tokens(ids, special, np.random.default_rng(7), **kwargs)
    b = mask_tokens(ids, special, np.random.default_rng(7), **kwargs)
    c = mask_tokens(ids, special, np.random.default_rng(8), **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_random_tokens_drawn_from_range():
    ids, special = padded_batch(B=64)
    masked, labels = mask_tokens(ids, special, np.random.default_rng(0), vocab_size=VOCAB,
                                 mask_token_id=MASK, random_token_low=900)
    replaced = (labels != -100) & (masked != MASK) & (masked != ids)
    assert replaced.any() and (masked[replaced] >= 900).all() and (masked[replaced] < VOCAB).all()


def test_whole_word_masking():
    ids, special = padded_batch(B=512, T=128)
    rng = np.random.default_rng(3)
    starts = rng.random(ids.shape) < 0.6  # words of ~1.7 tokens, some of 5+
    for max_predictions in (None, 12):
        masked, labels = mask_tokens(ids, special, rng, vocab_size=VOCAB, mask_token_id=MASK,
                                     whole_word_starts=starts, max_predictions=max_predictions)
        check_labels(ids, special, masked, labels)
        chosen = labels != -100
        # Word ids: a new word at each start, or after a special token.
        new_word = ~special & (starts | np.pad(special[:, :-1], ((0, 0), (1, 0)),
                                               constant_values=True))
        word = np.cumsum(new_word.ravel())[~special.ravel()]
        chosen_tokens = chosen.ravel()[~special.ravel()]
        word_starts = np.flatnonzero(np.diff(word, prepend=0))  # all or nothing per word:
        np.testing.assert_array_equal(np.minimum.reduceat(chosen_tokens, word_starts),
                                      np.maximum.reduceat(chosen_tokens, word_starts))
        assert (chosen.sum(axis=1) >= 1).all()
        if max_predictions:
            assert chosen.sum(axis=1).max() <= max_predictions
        else:
            assert abs(masked_stats(ids, special, masked, labels)["rate"] - 0.15) < 0.015
    # a continuation right after [CLS] starts a word of its own: still masked
    starts[:, 1] = False
    _, labels = mask_tokens(ids, special, rng, vocab_size=VOCAB, mask_token_id=MASK,
                            whole_word_starts=starts, mlm_probability=1.0)
    assert (labels[~special] != -100).all()


def test_span_mask():
    ids, special = padded_batch(B=512, T=128)
    for p in (0.15, 0.3):
        masked, labels = span_mask(ids, special, np.random.default_rng(5), vocab_size=VOCAB,
                                   mask_token_id=MASK, mask_probability=p)
        check_labels(ids, special, masked, labels)
        stats = masked_stats(ids, special, masked, labels)
        assert abs(stats["rate"] - p) < 0.01, stats
        assert abs(stats["mask"] - 0.8) < 0.02
        # runs of chosen positions: boundaries of the 0/1 signal, padded with 0 on both sides
        edges = np.diff(np.pad((labels != -100).astype(int), ((0, 0), (1, 1))), axis=1)
        run_lengths = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
        assert run_lengths.min() >= 1 and run_lengths.max() <= 3
        assert set(np.unique(run_lengths)) == {1, 2, 3}
    a = span_mask(ids, special, np.random.default_rng(1), vocab_size=VOCAB, mask_token_id=MASK)
    b = span_mask(ids, special, np.random.default_rng(1), vocab_size=VOCAB, mask_token_id=MASK)
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="too high"):
        span_mask(ids, special, np.random.default_rng(1), vocab_size=VOCAB, mask_token_id=MASK,
                  mask_probability=0.9)


def test_mask_tokens_matches_transformers_collator(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path))  # reads vocab.txt
    assert len(tokenizer) == VOCAB  # random replacements are drawn from the whole vocabulary
    assert [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id] == [
        CLS, SEP, MASK]
    ids, special = padded_batch(B=512, T=128)
    torch.manual_seed(0)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15,
                                                            return_tensors="pt")
    batch = collator([{"input_ids": row.tolist()} for row in ids])
    hf = masked_stats(ids, special, batch["input_ids"].numpy(), batch["labels"].numpy())
    ours = masked_stats(ids, special, *mask_tokens(ids, special, np.random.default_rng(0),
                                                   vocab_size=VOCAB, mask_token_id=MASK))
    assert abs(hf["rate"] - 0.15) < 0.01 and abs(ours["rate"] - 0.15) < 0.01
    assert abs(hf["rate"] - ours["rate"]) < 0.01
    for key in ("mask", "random", "kept"):
        assert abs(hf[key] - ours[key]) < 0.02, (key, hf, ours)


# --- NSP -------------------------------------------------------------------------------------

def encoded_corpus(rng, n_docs, sentences=(2, 30), lengths=(5, 40)):
    """Documents whose token at stream position k of document d is 10 + 10_000 d + k, so an
    instance tells where each of its tokens came from."""
    docs = []
    for d in range(n_docs):
        k, doc = 10 + 10_000 * d, []
        for length in rng.integers(*lengths, rng.integers(*sentences)):
            doc.append(list(range(k, k + length)))
            k += length
        docs.append(doc)
    return docs


def segments(row_ids):
    """(A, B) token arrays of one [CLS] A [SEP] B [SEP] pad... row, checking the layout."""
    assert row_ids[0] == CLS
    seps = np.flatnonzero(row_ids == SEP)
    assert len(seps) == 2
    assert (row_ids[seps[1] + 1:] == PAD).all()
    return row_ids[1:seps[0]], row_ids[seps[0] + 1:seps[1]]


def check_instances(out, max_seq_length):
    N = len(out["next_sentence_label"])
    for key in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask"):
        assert out[key].shape == (N, max_seq_length)
    for n in range(N):
        a, b = segments(out["input_ids"][n])
        assert len(a) >= 1 and len(b) >= 1
        real = 3 + len(a) + len(b)
        expected_types = [0] * (2 + len(a)) + [1] * (len(b) + 1) + [0] * (max_seq_length - real)
        np.testing.assert_array_equal(out["token_type_ids"][n], expected_types)
        np.testing.assert_array_equal(out["attention_mask"][n], np.arange(max_seq_length) < real)
        np.testing.assert_array_equal(out["special_tokens_mask"][n],
                                      np.isin(out["input_ids"][n], [CLS, SEP, PAD]))
        for segment in (a, b):  # each segment is one contiguous stretch of one document
            assert (np.diff(segment) == 1).all()


def test_nsp_layout_labels_and_provenance():
    rng = np.random.default_rng(0)
    docs = encoded_corpus(rng, 100, sentences=(2, 60))
    max_seq_length = 128
    out = nsp_instances(docs, np.random.default_rng(1), max_seq_length=max_seq_length,
                        cls_id=CLS, sep_id=SEP, pad_id=PAD)
    check_instances(out, max_seq_length)
    labels = out["next_sentence_label"]
    assert len(labels) > 400
    # The recipe leans a little to NotNext, as the original does: a NotNext pair uses only
    # A's sentences (the rest are read again) and a one-sentence chunk is always NotNext.
    assert 0.45 < labels.mean() < 0.6
    starts = {d: {s[0] for s in doc} for d, doc in enumerate(docs)}  # sentence starts
    for n, label in enumerate(labels):
        a, b = segments(out["input_ids"][n])
        doc_a, doc_b = a[0] // 10_000, b[0] // 10_000
        truncated = len(a) + len(b) == max_seq_length - 3
        if label == IS_NEXT:
            assert doc_a == doc_b and b[0] >= a[-1] + 1
            if not truncated:  # B starts at the sentence right after A
                assert b[0] == a[-1] + 1 and b[0] in starts[doc_b]
        else:
            assert label == NOT_NEXT and doc_a != doc_b
            if not truncated:
                assert b[0] in starts[doc_b]


def test_nsp_sentences_put_back_and_deterministic():
    """Without truncation (documents under half the length budget), the A segments and IsNext
    B segments of each document's instances, in order, cover it exactly once: sentences not
    used after a NotNext A are read again."""
    docs = encoded_corpus(np.random.default_rng(0), 80, sentences=(1, 8), lengths=(1, 8))
    out = nsp_instances(docs, np.random.default_rng(2), max_seq_length=128, short_seq_prob=0.0,
                        cls_id=CLS, sep_id=SEP, pad_id=PAD)
    check_instances(out, 128)
    covered = {d: [] for d in range(len(docs))}
    for n, label in enumerate(out["next_sentence_label"]):
        a, b = segments(out["input_ids"][n])
        covered[a[0] // 10_000].extend(a)
        if label == IS_NEXT:
            covered[a[0] // 10_000].extend(b)
    for d, doc in enumerate(docs):
        np.testing.assert_array_equal(covered[d], [t for s in doc for t in s])
    again = nsp_instances(docs, np.random.default_rng(2), max_seq_length=128, short_seq_prob=0.0,
                          cls_id=CLS, sep_id=SEP, pad_id=PAD)
    other = nsp_instances(docs, np.random.default_rng(3), max_seq_length=128, short_seq_prob=0.0,
                          cls_id=CLS, sep_id=SEP, pad_id=PAD)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    assert not np.array_equal(out["next_sentence_label"], other["next_sentence_label"])


def test_nsp_short_sequences_and_truncation():
    docs = encoded_corpus(np.random.default_rng(4), 30)
    out = nsp_instances(docs, np.random.default_rng(0), max_seq_length=24, short_seq_prob=0.5,
                        cls_id=CLS, sep_id=SEP, pad_id=PAD)
    check_instances(out, 24)
    assert out["attention_mask"].sum(axis=1).max() == 24
    assert out["attention_mask"].sum(axis=1).min() < 24


def test_nsp_degenerate_corpora():
    rng = np.random.default_rng(0)
    single = encoded_corpus(rng, 1, sentences=(40, 41), lengths=(30, 40))
    out = nsp_instances(single, rng, max_seq_length=64, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    check_instances(out, 64)
    assert len(out["input_ids"]) > 5 and (out["next_sentence_label"] == IS_NEXT).all()
    # one-sentence documents, empty sentences and documents: NotNext pairs, no crash
    tiny = [[[11, 12]], [], [[], [21]], [[31, 32, 33]]]
    out = nsp_instances(tiny, rng, max_seq_length=8, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    check_instances(out, 8)
    assert len(out["input_ids"]) == 3 and (out["next_sentence_label"] == NOT_NEXT).all()
    # a lone one-sentence document has no pair at all
    out = nsp_instances([[[11, 12, 13]]], rng, max_seq_length=8, cls_id=CLS, sep_id=SEP,
                        pad_id=PAD)
    assert out["input_ids"].shape == (0, 8) and out["next_sentence_label"].shape == (0,)
    with pytest.raises(ValueError, match="max_seq_length"):
        nsp_instances(tiny, rng, max_seq_length=4, cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_masked_positions_list_every_labelled_position():
    labels = np.full((3, 10), -100)
    labels[0, [2, 7]] = 5
    labels[1, [0, 1, 9]] = 6
    positions = masked_positions(labels, 4)
    np.testing.assert_array_equal(positions, [[2, 7, -1, -1], [0, 1, 9, -1], [-1, -1, -1, -1]])
    assert positions.dtype == np.int32
    with pytest.raises(ValueError, match="3 labelled tokens, more than max_predictions=2"):
        masked_positions(labels, 2)
