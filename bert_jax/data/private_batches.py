"""Batches for DP-SGD: a fixed list of examples, drawn anew every step by the privacy plan
(`training.privacy.DpPlan.sample`).

DP-SGD's guarantee is per sampled example, so the examples are fixed before training and a
step's batch is the plan's independent draw (Poisson: each example in with probability q),
not an epoch's shuffle. Pretraining examples are each document cut once into [CLS] ... [SEP]
pieces of at most `max_seq_length` (never two documents in one, no NSP), so the guarantee is
per piece, and per document through group privacy; fine-tuning examples are the task's.
Everything random is drawn from (seed, step, row), so a batch depends only on its step: the
iterator state is just the next step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bert_jax.data.batching import Features, pad_rows
from bert_jax.data.masking import mask_tokens
from bert_jax.data.pipeline import open_shards, process_slice
from bert_jax.data.records import decode_document


class PrivateBatches:
    """This process's rows of every step's sampled batch, built by
    `make_rows(step, rows_R, indices_R, mask_R)` (R: global row numbers of this process), plus
    `example_mask` (False on the plan's padding rows) and `example_id` (-1 there);
    `get_state` / `set_state` as the Grain iterators."""

    def __init__(self, plan, make_rows: Callable[..., dict], *, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self._plan, self._make_rows, self._seed = plan, make_rows, seed
        self._rows = np.arange(plan.rows)[process_slice(plan.rows, process_index, process_count)]
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        indices, mask = self._plan.sample(self._seed, self._step)
        indices, mask = indices[self._rows], mask[self._rows]
        batch = self._make_rows(self._step, self._rows, indices, mask)
        self._step += 1
        return {**batch, "example_mask": mask, "example_id": np.where(mask, indices, -1)}

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])


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


def mlm_rows(examples: list[np.ndarray], *, seed: int, max_seq_length: int, vocab_size: int,
             pad_id: int, mask_id: int, special_ids: tuple[int, ...],
             mlm_probability: float = 0.15) -> Callable[..., dict]:
    """Rows of `mlm_examples`, right-padded and masked (80/10/10) afresh at every step."""

    def make_rows(step, rows_R, indices_R, mask_R):
        input_ids = np.full((len(rows_R), max_seq_length), pad_id, np.int32)
        labels = np.full_like(input_ids, -100)
        for out, (row, index) in enumerate(zip(rows_R, indices_R)):
            example = examples[index]
            input_ids[out, :len(example)] = example
            rng = np.random.default_rng((seed, step, int(row)))
            input_ids[out], labels[out] = mask_tokens(
                input_ids[out], np.isin(input_ids[out], special_ids), rng,
                vocab_size=vocab_size, mask_token_id=mask_id, mlm_probability=mlm_probability)
        real = (np.arange(max_seq_length)[None, :]
                < np.array([len(examples[i]) for i in indices_R])[:, None])
        return {"input_ids": input_ids, "attention_mask": real.astype(np.int32),
                "token_type_ids": np.zeros_like(input_ids), "labels": labels}

    return make_rows


def task_rows(features: Features, *, length: int, pad_id: int) -> Callable[..., dict]:
    """Rows of fine-tuning `features`, right-padded to `length` (one bucket: no recompiles)."""

    def make_rows(step, rows_R, indices_R, mask_R):
        batch = pad_rows(features, indices_R, length, pad_id)
        del batch["example_id"]
        return batch

    return make_rows
