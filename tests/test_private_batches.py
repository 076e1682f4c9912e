"""DP-SGD's input: fixed single-document examples, each step's batch exactly the privacy
plan's sample, masked the same whoever builds it, split across processes."""

from __future__ import annotations

import numpy as np

from bert_jax.data.pipeline import open_shards
from bert_jax.data.prepare import read_shards
from bert_jax.data.private_batches import PrivateBatches, mlm_examples, mlm_rows
from bert_jax.data.records import decode_document
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.training.privacy import DpConfig

SEQ = 32


def setup(corpus, **plan):
    tokenizer = load_tokenizer(corpus / "tok")
    ids = {name: tokenizer.backend.token_to_id(token) for name, token in
           (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"))}
    examples = mlm_examples(read_shards(corpus / "train"), SEQ, ids["cls"], ids["sep"])
    dp_plan = DpConfig(clip_norm=1.0, delta=1e-5, noise_multiplier=1.0, **plan).plan(
        len(examples), batch_size=8, steps=50, multiple_of=4)

    rows = mlm_rows(examples, seed=3, max_seq_length=SEQ,
                    vocab_size=tokenizer.backend.get_vocab_size(), pad_id=ids["pad"],
                    mask_id=tokenizer.mask_token_id,
                    special_ids=(ids["cls"], ids["sep"], ids["pad"]))

    def batches(process_index=0, process_count=1):
        return PrivateBatches(dp_plan, rows, seed=3, process_index=process_index,
                              process_count=process_count)

    return examples, dp_plan, batches, ids


def test_examples_never_mix_documents(corpus):
    examples, _, _, ids = setup(corpus)
    source, count = open_shards(read_shards(corpus / "train"))
    documents = [np.concatenate(decode_document(source[i])) for i in range(count)]
    rebuilt, e = [], 0
    for doc in documents:
        pieces = []
        while sum(len(p) for p in pieces) < len(doc):
            example = examples[e]
            assert example[0] == ids["cls"] and example[-1] == ids["sep"] and len(example) <= SEQ
            pieces.append(example[1:-1])
            e += 1
        rebuilt.append(np.concatenate(pieces))
    assert e == len(examples)
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt, documents))


def test_batches_are_the_plans_samples(corpus):
    examples, plan, batches, ids = setup(corpus)
    stream = batches()
    for step in range(5):
        batch = next(stream)
        indices, mask = plan.sample(3, step)
        np.testing.assert_array_equal(batch["example_mask"], mask)
        assert batch["input_ids"].shape == (plan.rows, SEQ)
        for row in np.nonzero(mask)[0]:
            example = examples[indices[row]]
            original = np.where(batch["labels"][row] >= 0, batch["labels"][row],
                                batch["input_ids"][row])
            np.testing.assert_array_equal(original[:len(example)], example)
            assert (batch["labels"][row] >= 0).any() or len(example) <= 3
        assert (batch["example_id"][~mask] == -1).all()


def test_resume_and_processes_see_the_same_stream(corpus):
    _, _, batches, _ = setup(corpus)
    whole = batches()
    expected = [next(whole) for _ in range(4)]
    resumed = batches()
    resumed.set_state({"step": 2})
    batch = next(resumed)
    for key in expected[2]:
        np.testing.assert_array_equal(batch[key], expected[2][key])
    halves = [batches(i, 2) for i in range(2)]
    for batch in expected:
        parts = [next(h) for h in halves]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
