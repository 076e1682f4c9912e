"""Sentence-pair instances for next-sentence prediction, as Google's `create_pretraining_data.py`.

Host-side NumPy/Python only. Masking is left to `bert_jax.data.masking` so that it is drawn
afresh each epoch (dynamic masking); `special_tokens_mask` is returned for it.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

IS_NEXT, NOT_NEXT = 0, 1  # transformers' convention: 0 = B continues A


def nsp_instances(documents, rng: np.random.Generator, *, max_seq_length: int,
                  short_seq_prob: float = 0.1, cls_id: int, sep_id: int, pad_id: int,
                  dtype=np.int32) -> dict[str, np.ndarray]:
    """[CLS] A [SEP] B [SEP] pairs from `documents`: lists of sentences, each a list (or 1-D
    array) of token ids.

    Per document, as the original `create_instances_from_document`: a target length of
    `max_seq_length - 3` tokens (with probability `short_seq_prob` a random one in
    `2..max_seq_length - 3`); sentences are gathered into a chunk until it reaches the target;
    A = the chunk's first `a_end` sentences (random), B = the rest of the chunk (IsNext, label
    0) or, with probability 0.5 and always for a one-sentence chunk, sentences from a random
    other document up to the remaining length (NotNext, label 1), the chunk's unused sentences
    going back to be read again. `truncate_seq_pair` then trims the longer side.

    Differences, to never crash or mislabel: empty sentences and documents are dropped; the
    random document is drawn among the *other* documents (the original retries 10 times and
    may end up with the same one); with no other document, B is always the continuation and a
    chunk takes at least two sentences (a document's last one, if left alone, is skipped).
    Instances come in document order; shuffling is the loader's job.

    Returns `[N, max_seq_length]` arrays input_ids (padded with `pad_id`), token_type_ids
    (0 for [CLS] A [SEP] and padding, 1 for B [SEP]), attention_mask, special_tokens_mask
    (True on [CLS]/[SEP]/padding), and next_sentence_label `[N]`.
    """
    max_num_tokens = max_seq_length - 3
    if max_num_tokens < 2:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for two segments")
    docs = [d for d in ([s for s in doc if len(s)] for doc in documents) if d]
    pairs = []
    for index in range(len(docs)):
        pairs.extend(document_pairs(docs, index, rng, max_num_tokens, short_seq_prob))
    return pack_pairs(pairs, max_seq_length, cls_id, sep_id, pad_id, dtype)


def truncate_seq_pair(tokens_a, tokens_b, max_num_tokens: int, rng: np.random.Generator):
    """Trims the longer side one token at a time until both fit, each token from the front or
    the back at random (drawn at once: the number cut from the front is Binomial(cut, 0.5))."""
    len_a, len_b = len(tokens_a), len(tokens_b)
    while len_a + len_b > max_num_tokens:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    front_a = rng.binomial(len(tokens_a) - len_a, 0.5)
    front_b = rng.binomial(len(tokens_b) - len_b, 0.5)
    return tokens_a[front_a:front_a + len_a], tokens_b[front_b:front_b + len_b]


def document_pairs(docs, index, rng, max_num_tokens, short_seq_prob):
    """(tokens_a, tokens_b, label) for `docs[index]`, the original's chunking loop (also run by
    the streaming pipeline, one document at a time)."""
    document = docs[index]
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_num_tokens + 1))
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        # with no other document for a NotNext B, a chunk needs two sentences to make a pair
        if i == len(document) - 1 or (length >= target and (len(chunk) > 1 or len(docs) > 1)):
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = list(chain.from_iterable(chunk[:a_end]))
            random_next = len(docs) > 1 and (len(chunk) == 1 or rng.random() < 0.5)
            if random_next:
                other = int(rng.integers(len(docs) - 1))
                other_doc = docs[other + (other >= index)]
                tokens_b = []
                for sentence in other_doc[int(rng.integers(len(other_doc))):]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target - len(tokens_a):
                        break
                i -= len(chunk) - a_end  # the unused sentences are read again
            else:
                tokens_b = list(chain.from_iterable(chunk[a_end:]))
            if tokens_b:  # empty only for a one-sentence chunk with no other document
                pairs.append((*truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng),
                              NOT_NEXT if random_next else IS_NEXT))
            chunk, length = [], 0
        i += 1
    return pairs


def pack_pairs(pairs, max_seq_length, cls_id, sep_id, pad_id, dtype):
    """Lays the pairs out as [CLS] A [SEP] B [SEP] rows padded to `max_seq_length`."""
    N, T = len(pairs), max_seq_length
    input_ids = np.full((N, T), pad_id, dtype)
    for n, (a, b, _) in enumerate(pairs):
        input_ids[n, 1:1 + len(a)] = a
        input_ids[n, 2 + len(a):2 + len(a) + len(b)] = b
    sep1_Nx1 = np.array([1 + len(a) for a, _, _ in pairs], np.int64).reshape(N, 1)
    sep2_Nx1 = sep1_Nx1 + 1 + np.array([len(b) for _, b, _ in pairs], np.int64).reshape(N, 1)
    position_T = np.arange(T)
    input_ids[:, 0] = cls_id
    sep_NxT = (position_T == sep1_Nx1) | (position_T == sep2_Nx1)
    input_ids[sep_NxT] = sep_id
    real_NxT = position_T <= sep2_Nx1
    return {
        "input_ids": input_ids,
        "token_type_ids": ((position_T > sep1_Nx1) & real_NxT).astype(dtype),
        "attention_mask": real_NxT.astype(dtype),
        "special_tokens_mask": (position_T == 0) | sep_NxT | ~real_NxT,
        "next_sentence_label": np.array([label for _, _, label in pairs], dtype),
    }
