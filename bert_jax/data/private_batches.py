"""Masked-LM batches for DP-SGD: a fixed list of examples, drawn anew every step by the
privacy plan (`training.privacy.DpPlan.sample`).

DP-SGD's guarantee is per sampled example, so the examples are fixed before training (each
document cut once into [CLS] ... [SEP] pieces of at most `max_seq_length`, never mixing two
documents, and no NSP) and a step's batch is the plan's independent draw (Poisson: each
example in with probability q), not an epoch's shuffle. The guarantee is then per example,
and per document through group privacy. Masking is drawn from (seed, step, row), so a batch
depends only on its step: the iterator state is just the next step.
"""

from __future__ import annotations

import numpy as np

from bert_jax.data.masking import mask_tokens
from bert_jax.data.pipeline import open_shards, process_slice
from bert_jax.data.records import decode_document


def mlm_examples(shards: list[str], max_seq_length: int, cls_id: int,
                 sep_id: int) -> list[np.ndarray]:
    """Every document's tokens, cut into consecutive pieces wrapped in [CLS] ... [SEP]."""
    source, _ = open_shards(shards)
    width = max_seq_length - 2
    examples = []
    for index in range(len(source)):
        tokens = np.concatenate([np.zeros(0, np.int32), *decode_document(source[index])])
        for start in range(0, len(tokens), width):
            examples.append(np.concatenate([[cls_id], tokens[start:start + width], [sep_id]])
                            .astype(np.int32))
    return examples


class PrivateBatches:
    """This process's rows of every step's sampled batch, with `example_mask` (False on the
    plan's padding rows), MLM-masked; `get_state` / `set_state` as the Grain iterators."""

    def __init__(self, examples: list[np.ndarray], plan, *, seed: int, max_seq_length: int,
                 vocab_size: int, pad_id: int, mask_id: int, special_ids: tuple[int, ...],
                 mlm_probability: float = 0.15, process_index: int = 0, process_count: int = 1):
        self._examples, self._plan, self._seed = examples, plan, seed
        self._length, self._pad_id, self._special_ids = max_seq_length, pad_id, special_ids
        self._masking = dict(vocab_size=vocab_size, mask_token_id=mask_id,
                             mlm_probability=mlm_probability)
        self._own = process_slice(plan.rows, process_index, process_count)
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        indices, mask = self._plan.sample(self._seed, self._step)
        rows = np.arange(self._plan.rows)[self._own]
        input_ids = np.full((len(rows), self._length), self._pad_id, np.int32)
        for out, row in enumerate(rows):
            example = self._examples[indices[row]]
            input_ids[out, :len(example)] = example
        real = input_ids != self._pad_id
        labels = np.full_like(input_ids, -100)
        for out, row in enumerate(rows):
            rng = np.random.default_rng((self._seed, self._step, int(row)))
            input_ids[out], labels[out] = mask_tokens(
                input_ids[out], np.isin(input_ids[out], self._special_ids), rng,
                **self._masking)
        self._step += 1
        return {"input_ids": input_ids, "attention_mask": real.astype(np.int32),
                "token_type_ids": np.zeros_like(input_ids), "labels": labels,
                "example_mask": mask[rows], "example_id": np.where(mask[rows], indices[rows], -1)}

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])
