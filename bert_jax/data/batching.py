"""Fine-tuning batches on Grain, padded to a few bucket lengths.

Examples are tokenised once (`Features`, unpadded). A batch is padded to the smallest bucket
length that holds its longest example, so `jax.jit` compiles one function per bucket rather
than one per length. Every batch has `batch_size` rows: a stream of whole epochs ends with a
partial batch filled up with padding rows (attention_mask 0, example_id -1, labels -100, or 0
where they are floats) unless `drop_remainder`, so evaluation sees every example with the same
batch shapes.

As in the pretraining pipelines, each process runs the global stream of batches and keeps
its slice; the bucket is chosen from the global batch, so all processes pad alike, and the
iterator's state (`get_state` / `set_state`) is the same on all of them.

`index_batches` is the epoch/shuffle/state logic alone, which `data.packing` shares for its
packed rows.

The finetune trainer calls `batches(task_data.train, batch_size=..., buckets=bucket_lengths(
max_seq_length), pad_id=tokenizer.pad_token_id, seed=..., num_epochs=None,
drop_remainder=True)` to train and the same on `task_data.eval` with no seed, one epoch and
no `drop_remainder` to evaluate, dropping the rows whose example_id is -1 from the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
import tokenizers

from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.pipeline import PipelineIterator, process_slice


@dataclasses.dataclass(frozen=True)
class Features:
    """Tokenised examples, unpadded: `[T_i]` int32 input_ids and token_type_ids per example,
    and labels: one `[T_i]` int32 array per example (token classification, -100 where not
    labelled), one array over examples: `[N]` int32 class ids, `[N]` float32 regression
    targets or `[N, C]` float32 multi-hot rows, or None (inference)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: list[np.ndarray] | np.ndarray | None = None

    @classmethod
    def from_encodings(cls, encodings: Sequence[tokenizers.Encoding],
                       labels: list[np.ndarray] | np.ndarray | None = None) -> Features:
        return cls([np.array(e.ids, np.int32) for e in encodings],
                   [np.array(e.type_ids, np.int32) for e in encodings], labels)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A fine-tuning task's data as the trainer takes it: the splits' features and the label
    map (the model's `id2label`, in id order), with transformers' `problem_type` for sequence
    classification (None for token classification)."""

    train: Features | None
    eval: Features | None
    labels: tuple[str, ...]
    problem_type: str | None = None


def bucket_lengths(max_length: int, smallest: int = 16, midpoints: bool = False) -> tuple[int, ...]:
    """The powers of two from `smallest` up to `max_length`, then `max_length` itself.

    `midpoints` adds 1.5 x each power (16, 24, 32, 48, ...): a padded row is then at most a
    third padding instead of a half, for twice the shapes to compile.
    """
    powers = [smallest]
    while powers[-1] * 2 < max_length:
        powers.append(powers[-1] * 2)
    lengths = sorted({*powers, *(p * 3 // 2 for p in powers if midpoints and p * 3 // 2 > p)})
    return tuple(length for length in lengths if length < max_length) + (max_length,)


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size`, else `size` itself (an over-long input then
    reaches the model, which names its limit in the error)."""
    return next((b for b in buckets if b >= size), size)


def batches(features: Features, *, batch_size: int, buckets: tuple[int, ...], pad_id: int,
            seed: int | None = None, num_epochs: int | None = 1, drop_remainder: bool = False,
            process_index: int = 0, process_count: int = 1) -> PipelineIterator:
    """Batches of `[B, L]` int32 input_ids, attention_mask, token_type_ids, labels (`[B]`,
    `[B, C]` or `[B, L]`, as `features.labels`) and `[B]` int64 example_id (the index in
    `features`, -1 on padding rows), L the bucket of the global batch's longest example and
    B = batch_size / process_count.

    `seed` shuffles the examples, afresh every epoch; None keeps their order (evaluation).
    `num_epochs=None` repeats forever (training by steps).
    """
    if max(map(len, features.input_ids)) > max(buckets):
        raise ValueError(f"an example of {max(map(len, features.input_ids))} tokens is longer "
                         f"than the longest bucket, {max(buckets)}")
    own = process_slice(batch_size, process_index, process_count)

    def collate(ids_B: np.ndarray) -> dict[str, np.ndarray]:
        length = bucket(max(len(features.input_ids[i]) for i in ids_B if i >= 0), buckets)
        return pad_rows(features, ids_B[own], length, pad_id)

    return index_batches(len(features), collate, batch_size=batch_size, seed=seed,
                         num_epochs=num_epochs, drop_remainder=drop_remainder)


def index_batches(count: int, collate, *, batch_size: int, seed: int | None,
                  num_epochs: int | None, drop_remainder: bool) -> PipelineIterator:
    """`collate(ids_B)` of every global batch of indices into `count` items (`[B]` int64, -1
    on the rows that fill up a last partial batch), shuffled by `seed` afresh every epoch."""

    def batch_fn(indices: list[int]) -> dict[str, np.ndarray]:
        ids_B = np.full(batch_size, -1, np.int64)
        ids_B[:len(indices)] = indices
        return collate(ids_B)

    ds = grain.MapDataset.range(count)
    if seed is not None:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).to_iter_dataset()
    return PipelineIterator(iter(ds.batch(batch_size, drop_remainder=drop_remainder,
                                          batch_fn=batch_fn)))


def pad_rows(features: Features, example_ids_B: np.ndarray, length: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """The examples `example_ids_B` (-1: a padding row) right-padded to `length`; labels
    only when `features` has them."""
    rows = len(example_ids_B)
    out = {"input_ids": np.full((rows, length), pad_id, np.int32),
           "attention_mask": np.zeros((rows, length), np.int32),
           "token_type_ids": np.zeros((rows, length), np.int32)}
    per_token = isinstance(features.labels, list)
    if per_token:
        out["labels"] = np.full((rows, length), IGNORE_INDEX, np.int32)
    elif features.labels is not None:
        out["labels"] = empty_labels(features.labels, rows)
    for row, index in enumerate(example_ids_B):
        if index < 0:
            continue
        n = len(features.input_ids[index])
        out["input_ids"][row, :n] = features.input_ids[index]
        out["attention_mask"][row, :n] = 1
        out["token_type_ids"][row, :n] = features.token_type_ids[index]
        if per_token:
            out["labels"][row, :n] = features.labels[index]
        elif features.labels is not None:
            out["labels"][row] = features.labels[index]
    return out | {"example_id": np.asarray(example_ids_B, np.int64)}


def empty_labels(labels: np.ndarray, *slots: int) -> np.ndarray:
    """Per-example label slots `[*slots, ...]` for `labels`' rows, all ignored: -100 for class
    ids, 0 for floats (which the batch's example ids or cls positions tell apart)."""
    fill = IGNORE_INDEX if np.issubdtype(labels.dtype, np.integer) else 0
    return np.full((*slots, *labels.shape[1:]), fill, labels.dtype)
