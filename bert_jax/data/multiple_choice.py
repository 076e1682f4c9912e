"""Multiple choice data, SWAG-style: a context, an optional question start and N endings per
example, from a local table (CSV/TSV/JSON Lines), tokenised as `transformers`' run_swag:
choice i is the pair (context, question + " " + ending i), truncated longest first.

`batching.batches` pads one row per example; a multiple-choice model takes `[B, C, L]`. So
the examples' `Features` carry, for bucketing, the ids of each example's longest choice, and
`choice_batch` turns a batch of them into the `[B, C, L]` batch of all choices, with the
same bucket length L and example ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bert_jax.data.batching import Features, pad_rows
from bert_jax.data.encoding import encode
from bert_jax.data.finetune_files import Record, read_table
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceData:
    """Where the examples are and which columns hold the context, question and endings.
    The defaults are SWAG's columns."""

    train: str | None = None  # a .csv/.tsv/.jsonl file
    eval: str | None = None
    context_column: str = "sent1"
    question_column: str | None = "sent2"  # None: the endings alone follow the context
    ending_columns: tuple[str, ...] = ("ending0", "ending1", "ending2", "ending3")
    label_column: str = "label"  # the index of the right ending
    max_seq_length: int = 128


@dataclasses.dataclass(frozen=True)
class ChoiceFeatures:
    examples: Features  # per example: its longest choice's ids, and the label `[N]`
    choices: Features  # per choice: example i's choices at rows i*C .. i*C + C-1

    @property
    def num_choices(self) -> int:
        return len(self.choices) // len(self.examples)


def load_multiple_choice(config: MultipleChoiceData, tokenizer: Tokenizer, split: str
                         ) -> ChoiceFeatures:
    """The examples of `split` (a file), tokenised."""
    records = read_table(split)
    pairs, labels = [], []
    for record in records:
        context = record.text(config.context_column)
        question = "" if config.question_column is None else record.text(config.question_column)
        pairs += [(context, f"{question} {record.text(column)}".strip())
                  for column in config.ending_columns]
        labels.append(_label(record, config.label_column, len(config.ending_columns)))
    choices = Features.from_encodings(encode(tokenizer, [first for first, _ in pairs],
                                             [second for _, second in pairs],
                                             max_length=config.max_seq_length))
    width = len(config.ending_columns)
    longest = [max(range(i, i + width), key=lambda j: len(choices.input_ids[j]))
               for i in range(0, len(pairs), width)]
    examples = Features([choices.input_ids[j] for j in longest],
                        [choices.token_type_ids[j] for j in longest], np.array(labels, np.int32))
    return ChoiceFeatures(examples, choices)


def choice_batch(batch: dict[str, np.ndarray], features: ChoiceFeatures,
                 pad_id: int) -> dict[str, np.ndarray]:
    """A batch of `features.examples` (from `batching.batches`) -> the same examples' choices
    as `[B, C, L]` arrays, with the batch's labels and example ids."""
    example_ids_B = batch["example_id"]
    num_choices, (rows, length) = features.num_choices, batch["input_ids"].shape
    choice_ids = np.where(example_ids_B[:, None] >= 0,
                          example_ids_B[:, None] * num_choices + np.arange(num_choices), -1)
    padded = pad_rows(features.choices, choice_ids.reshape(-1), length, pad_id)
    return {**{k: padded[k].reshape(rows, num_choices, length) for k in INPUTS},
            "labels": batch["labels"], "example_id": example_ids_B}


def _label(record: Record, column: str, num_choices: int) -> int:
    value = record.get(column)
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < num_choices or str(value).strip() != str(label):
        raise BertJaxError(f"{record.where}: label {value!r} is not the index of an ending "
                           f"(0 to {num_choices - 1})")
    return label
