"""Fine-tuning examples packed into full rows (`data.pack: true`), so that a step computes on
real tokens rather than padding.

`pack` places the examples (`batching.Features`) into rows of `max_length` slots by best-fit
decreasing: longest first, each into the open row it fills best, a new row when none has room.
It depends on the lengths only, so it is done once, before training, and `packed_batches`
shuffles the rows afresh every epoch and batches them as `batching.batches` does examples (the
same grain iterator state, process slices and filler rows); `train.batch_size` then counts rows.

A row keeps its examples apart, so each is computed as it would be alone: `segment_ids`
number them 1..k (0 on the padding at the row's end), the models attend within a segment only,
`position_ids` restart at 0 in each, and token types are each example's own. Labels are laid
out per token (token classification; -100 elsewhere) or, per example, in `[B, P]` slots
(`[B, P, C]` multi-hot) beside `cls_positions` `[B, P]`, each segment's first token (-1 for an
empty slot), P the most examples a row holds; `example_id` `[B, P]` says which example each
slot holds (-1: none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bert_jax.data.batching import Features, empty_labels, index_batches
from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.pipeline import PipelineIterator, process_slice


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Example indices per row, rows of at most `max_length` tokens (best-fit decreasing,
    ties in index order: deterministic)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"an example of {lengths.max()} tokens is longer than a packed row, "
                         f"{max_length}")
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # room left -> open rows
    for index in np.argsort(-lengths, kind="stable"):
        need = int(lengths[index])
        room = next((r for r in range(need, max_length + 1) if by_room[r]), None)
        if room is None:
            row, room = len(rows), max_length
            rows.append([])
        else:
            row = by_room[room].pop()
        rows[row].append(int(index))
        by_room[room - need].append(row)
    return rows


def efficiency(lengths: Sequence[int], rows: list[list[int]], max_length: int) -> float:
    """Real tokens / token slots of the packed `rows`: the share of a step's work that is
    not padding."""
    return float(np.sum([lengths[i] for row in rows for i in row])) / (len(rows) * max_length)


def packed_batches(features: Features, rows: list[list[int]], *, batch_size: int,
                   max_length: int, pad_id: int, seed: int | None = None,
                   num_epochs: int | None = 1, drop_remainder: bool = False,
                   process_index: int = 0, process_count: int = 1) -> PipelineIterator:
    """Batches of `B = batch_size / process_count` of the packed `rows` (from `pack`), laid
    out by `packed_rows`; `seed`, `num_epochs` and `drop_remainder` as `batching.batches`."""
    own = process_slice(batch_size, process_index, process_count)
    max_segments = max(map(len, rows))

    def collate(ids_B: np.ndarray) -> dict[str, np.ndarray]:
        return packed_rows(features, [rows[i] if i >= 0 else [] for i in ids_B[own]],
                           max_length, pad_id, max_segments)

    return index_batches(len(rows), collate, batch_size=batch_size, seed=seed,
                         num_epochs=num_epochs, drop_remainder=drop_remainder)


def packed_rows(features: Features, rows_B: list[list[int]], length: int, pad_id: int,
                max_segments: int) -> dict[str, np.ndarray]:
    """Rows of `length` holding the examples `rows_B` (an empty list: a padding row), as the
    module docstring lays them out; labels only when `features` has them."""
    shape = (len(rows_B), length)
    out = {"input_ids": np.full(shape, pad_id, np.int32),
           "token_type_ids": np.zeros(shape, np.int32),
           "position_ids": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32),
           "example_id": np.full((len(rows_B), max_segments), -1, np.int64)}
    per_token = isinstance(features.labels, list)
    per_example = not per_token and features.labels is not None
    if per_token:
        out["labels"] = np.full(shape, IGNORE_INDEX, np.int32)
    elif per_example:
        out["labels"] = empty_labels(features.labels, len(rows_B), max_segments)
        out["cls_positions"] = np.full((len(rows_B), max_segments), -1, np.int32)
    for row, examples in enumerate(rows_B):
        start = 0
        for segment, index in enumerate(examples):
            span = slice(start, start + len(features.input_ids[index]))
            out["input_ids"][row, span] = features.input_ids[index]
            out["token_type_ids"][row, span] = features.token_type_ids[index]
            out["position_ids"][row, span] = np.arange(span.stop - span.start)
            out["segment_ids"][row, span] = segment + 1
            out["example_id"][row, segment] = index
            if per_token:
                out["labels"][row, span] = features.labels[index]
            elif per_example:
                out["labels"][row, segment] = features.labels[index]
                out["cls_positions"][row, segment] = start
            start = span.stop
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    return out
