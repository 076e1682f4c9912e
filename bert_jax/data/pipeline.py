"""Pretraining input pipelines on Grain: ArrayRecord shards of documents -> batches of NumPy arrays.

`bert_pipeline` gives BERT's MLM (+ NSP) batches, `gpt_bert_pipeline` GPT-BERT's packed
masked/causal rows. Both are host-side NumPy only (no jax device ops) and share one plan:

- **Documents** are read by random access (`grain.sources.ArrayRecordDataSource`) through a
  `MapDataset` of document indices, shuffled globally by the seed and reshuffled every epoch
  (grain's `shuffle` under `repeat` uses seed + epoch), so an epoch visits each document once
  and a NotNext partner can be fetched from anywhere in the corpus.
- **Processes**: each process runs the *global* stream of examples and keeps its slice of
  every global batch, so the global batch is the same whatever the number of processes (a run
  may resume on another topology). What every process repeats is the cheap part (reading,
  NSP pairing, packing); the per-example arrays and the masking are built for its slice only.
- **Randomness** never flows through a shared generator: every draw comes from a generator
  seeded by (seed, purpose, epoch, document) or (seed, purpose, example id), so an example is
  the same whichever process, batch, worker or restart produces it. The iterator's state is
  then only grain's positions: a small dict, restored with `set_state` to continue exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np
from absl import flags

from bert_jax.data.masking import IGNORE_INDEX, mask_tokens, masked_positions, span_mask
from bert_jax.data.nsp import document_pairs, pack_pairs
from bert_jax.data.records import decode_document

_PARTNER, _NSP, _MLM, _ROW = range(4)  # rng purposes, so no two draws share a seed
_INSTANCE_BITS = 20  # example id = (epoch * num_documents + document) << 20 | instance


def bert_pipeline(shards: list[str], *, seed: int, global_batch_size: int, max_seq_length: int,
                  vocab_size: int, cls_id: int, sep_id: int, pad_id: int, mask_id: int,
                  mlm_probability: float = 0.15, max_predictions_per_seq: int | None = None,
                  whole_word_starts_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                  nsp: bool = True, short_seq_prob: float = 0.1, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None,
                  shuffle_window: int = 1024, worker_count: int = 0,
                  read_options: grain.ReadOptions | None = None) -> PipelineIterator:
    """BERT pretraining batches: `[B, max_seq_length]` int32 input_ids, attention_mask,
    token_type_ids, labels (-100 where not predicted), `[B]` int32 next_sentence_label (when
    `nsp`) and int64 example_id (see `split_example_id`), B = global_batch_size / process_count;
    with `max_predictions_per_seq`, also `[B, max_predictions_per_seq]` masked_positions
    (`masking.masked_positions`), so that the MLM head runs on those positions only.

    Every epoch rebuilds each document's [CLS] A [SEP] B [SEP] instances with fresh random
    chunking (`nsp_instances`' algorithm, NotNext B from one random other document) and masks
    each instance afresh (dynamic masking, `mask_tokens`; `whole_word_starts_fn(ids_BxT)` ->
    bool word starts turns on whole-word masking). Without `nsp`, B is always the true
    continuation and no label is given. Instances of one document would sit side by side, so
    they are shuffled in windows of `shuffle_window`. The last partial global batch is dropped;
    `num_epochs=None` repeats forever. `worker_count` > 0 builds batches in that many
    processes (grain's `mp_prefetch`; the stream then depends on it, still deterministically).
    `read_options` go to grain's `to_iter_dataset`, which reads documents ahead in threads
    (grain's default, 16 threads, suits remote storage; with local files on few cores
    `grain.ReadOptions(num_threads=0)` is faster, as the threads then only contend for the GIL).
    """
    source, num_documents = open_shards(shards)
    own = process_slice(global_batch_size, process_index, process_count)

    def read(item):
        """(epoch, index, [document, NotNext partner]): the I/O, run in grain's read threads."""
        epoch, index = item
        documents = [_sentences(source[index])]
        if nsp and num_documents > 1:
            other = int(np.random.default_rng((seed, _PARTNER, epoch, index))
                        .integers(num_documents - 1))
            documents.append(_sentences(source[other + (other >= index)]))
        return epoch, index, documents

    def instances(item):
        """The (example id, (tokens_a, tokens_b, label)) instances of one document."""
        epoch, index, documents = item
        if not documents[0]:
            return []
        pairs = document_pairs([d for d in documents if d], 0,
                               np.random.default_rng((seed, _NSP, epoch, index)),
                               max_seq_length - 3, short_seq_prob)
        if len(pairs) >> _INSTANCE_BITS:
            raise ValueError(f"document {index} gives {len(pairs)} instances, over the "
                             f"{1 << _INSTANCE_BITS} an example id can number")
        first = (epoch * num_documents + index) << _INSTANCE_BITS
        return [(first + i, pair) for i, pair in enumerate(pairs)]

    def collate(examples):
        """A global batch of instances -> this process's slice, laid out and masked."""
        ids = np.array([example_id for example_id, _ in examples[own]], np.int64)
        out = pack_pairs([pair for _, pair in examples[own]], max_seq_length, cls_id, sep_id,
                         pad_id, np.int32)
        special = out.pop("special_tokens_mask")
        if not nsp:
            del out["next_sentence_label"]
        starts = (None if whole_word_starts_fn is None
                  else np.asarray(whole_word_starts_fn(out["input_ids"]), bool))
        out["labels"] = np.empty_like(out["input_ids"])
        for row, example_id in enumerate(ids):
            out["input_ids"][row], out["labels"][row] = mask_tokens(
                out["input_ids"][row], special[row],
                np.random.default_rng((seed, _MLM, int(example_id))),
                vocab_size=vocab_size, mask_token_id=mask_id, mlm_probability=mlm_probability,
                max_predictions=max_predictions_per_seq,
                whole_word_starts=None if starts is None else starts[row])
        if max_predictions_per_seq is not None:
            out["masked_positions"] = masked_positions(out["labels"], max_predictions_per_seq)
        return out | {"example_id": ids}

    ds = _documents(num_documents, seed, num_epochs).map(read).to_iter_dataset(read_options)
    ds = grain.experimental.FlatMapIterDataset(ds, _FlatMap(instances))
    if shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window,
                                                         seed=seed)
    return _iterate(ds.batch(global_batch_size, drop_remainder=True, batch_fn=collate),
                    worker_count)


def gpt_bert_pipeline(shards: list[str], *, seed: int, global_batch_size: int,
                      max_seq_length: int, vocab_size: int, bos_id: int, pad_id: int,
                      mask_id: int, masked_ratio: float = 0.5, mask_probability: float = 0.15,
                      max_span_length: int = 3, process_index: int = 0, process_count: int = 1,
                      num_epochs: int | None = None, worker_count: int = 0,
                      read_options: grain.ReadOptions | None = None) -> PipelineIterator:
    """GPT-BERT (NorBERT 4) batches of packed rows, keyed by the model's inputs:
    `[B, max_seq_length]` int32 input_ids, attention_mask, labels, segment_ids, position_ids
    and `[B]` bool causal_rows, int64 example_id (the row's index in the global stream),
    B = global_batch_size / process_count.

    Documents (sentences joined, `bos_id` prepended) are concatenated in shuffled order and
    cut into full rows (grain's `ConcatThenSplitIterDataset`): segment_ids number the documents
    of a row from 1, position_ids restart at 0 for each. A document cut at a row's end goes on in
    the next row as a new segment (positions from 0, no BOS); only the stream's last row has
    padding (`pad_id`, segment 0). A row is masked with probability `masked_ratio` (span
    masking, `span_mask`), else causal. Labels are aligned with the inputs (the GPT-BERT loss
    shifts them): causal rows label every real token, masked rows their masked tokens; a
    segment's first token is never labelled nor masked, since it would be predicted from the
    previous document. `worker_count` and `read_options` as in `bert_pipeline`.
    """
    source, num_documents = open_shards(shards)
    own = process_slice(global_batch_size, process_index, process_count)

    def tokens(item):
        return {"input_ids": np.concatenate([[bos_id], *decode_document(source[item[1]])],
                                            dtype=np.int32)}

    def collate(rows):
        """A global batch of packed rows -> this process's slice, labelled and masked."""
        ids = np.array([index for index, _ in rows[own]], np.int64)
        input_ids = np.stack([row["input_ids"] for _, row in rows[own]])
        segment_ids = np.stack([row["input_ids_segment_ids"] for _, row in rows[own]])
        positions = np.stack([row["input_ids_positions"] for _, row in rows[own]])
        real, first = segment_ids > 0, positions == 0
        input_ids[~real] = pad_id
        labels = np.where(real & ~first, input_ids, IGNORE_INDEX).astype(np.int32)
        causal_rows = np.empty(len(ids), bool)
        for row, index in enumerate(ids):
            rng = np.random.default_rng((seed, _ROW, int(index)))
            causal_rows[row] = rng.random() >= masked_ratio
            if not causal_rows[row]:
                input_ids[row], labels[row] = span_mask(
                    input_ids[row], ~real[row] | first[row], rng, vocab_size=vocab_size,
                    mask_token_id=mask_id, mask_probability=mask_probability,
                    max_span_length=max_span_length)
        return {"input_ids": input_ids, "attention_mask": real.astype(np.int32),
                "labels": labels, "segment_ids": segment_ids, "position_ids": positions,
                "causal_rows": causal_rows, "example_id": ids}

    ds = _documents(num_documents, seed, num_epochs).map(tokens).to_iter_dataset(read_options)
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"input_ids": max_seq_length})
    ds = ds.map_with_index(lambda index, row: (index, row))
    return _iterate(ds.batch(global_batch_size, drop_remainder=True, batch_fn=collate),
                    worker_count)


BatchSpec = dict[str, tuple[tuple[int, ...], np.dtype]]  # array name -> (shape, dtype)


def bert_batch_spec(rows: int, max_seq_length: int, *, nsp: bool = True,
                    max_predictions_per_seq: int | None = None) -> BatchSpec:
    """The arrays of a `bert_pipeline` batch of `rows` rows, read from no data (what an
    ahead-of-time compile of the train step takes)."""
    row, tokens = (rows,), (rows, max_seq_length)
    spec = {name: (tokens, np.dtype(np.int32))
            for name in ("input_ids", "token_type_ids", "attention_mask", "labels")}
    if nsp:
        spec["next_sentence_label"] = (row, np.dtype(np.int32))
    if max_predictions_per_seq is not None:
        spec["masked_positions"] = ((rows, max_predictions_per_seq), np.dtype(np.int32))
    return spec | {"example_id": (row, np.dtype(np.int64))}


def gpt_bert_batch_spec(rows: int, max_seq_length: int) -> BatchSpec:
    """The arrays of a `gpt_bert_pipeline` batch of `rows` rows, read from no data."""
    tokens = (rows, max_seq_length)
    spec = {name: (tokens, np.dtype(np.int32)) for name in
            ("input_ids", "attention_mask", "labels", "segment_ids", "position_ids")}
    return spec | {"causal_rows": ((rows,), np.dtype(bool)),
                   "example_id": ((rows,), np.dtype(np.int64))}


def split_example_id(example_id, num_documents: int):
    """(epoch, document index, instance index within the document) of `bert_pipeline` ids."""
    example_id = np.asarray(example_id, np.int64)
    epoch, document = np.divmod(example_id >> _INSTANCE_BITS, num_documents)
    return epoch, document, example_id & ((1 << _INSTANCE_BITS) - 1)


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of every global batch (each process runs the global stream)."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    size = global_batch_size // process_count
    return slice(process_index * size, (process_index + 1) * size)


class PipelineIterator:
    """Grain's iterator whose state may go through JSON (as grain's own checkpoint handler and
    `TrainCheckpoints`' record do). The state is the same on every process (each runs the
    global stream), so one process's saved state restores all of them."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(_from_json(state))

    def close(self) -> None:
        """Stops the worker processes of `worker_count` > 0 (also done on garbage collection)."""
        getattr(self._iterator, "close", lambda: None)()


@dataclasses.dataclass(frozen=True)
class _FlatMap(grain.experimental.FlatMapTransform):
    fn: Callable[[Any], list]
    max_fan_out: int = 1 << _INSTANCE_BITS  # only MapDataset flat maps read it

    def flat_map(self, element):
        return self.fn(element)


def open_shards(shards):
    """(random-access source of document records, number of documents)."""
    source = grain.sources.ArrayRecordDataSource(list(shards))
    if not len(source):
        raise ValueError(f"no documents in the shards {list(shards)}")
    return source, len(source)


def _documents(num_documents: int, seed: int, num_epochs: int | None) -> grain.MapDataset:
    """(epoch, document index): every document once per epoch, reshuffled each epoch."""
    return (grain.MapDataset.range(num_documents).shuffle(seed).repeat(num_epochs)
            .map_with_index(lambda i, index: (i // num_documents, index)))


def _sentences(record: bytes) -> list[list[int]]:
    """A record's non-empty sentences as Python lists (NSP pairing joins them token by token,
    which is faster on lists than on NumPy arrays)."""
    return [s.tolist() for s in decode_document(record) if len(s)]


def _iterate(ds: grain.IterDataset, worker_count: int) -> PipelineIterator:
    if worker_count:
        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag in mp_prefetch (#1355)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return PipelineIterator(iter(ds))


def _from_json(state):
    """Undoes what JSON does to grain 0.2.18's state here: `ConcatThenSplitIterDataset` tests its
    `remainder_slices` against the tuple (-1, -1), which a JSON list never equals (it would
    then restore a remainder that is not there)."""
    if isinstance(state, list):
        return [_from_json(value) for value in state]
    if not isinstance(state, dict):
        return state
    return {key: ({name: tuple(s) for name, s in value.items()} if key == "remainder_slices"
                  else _from_json(value)) for key, value in state.items()}
