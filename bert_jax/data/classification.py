"""Sequence classification data: single-label, multi-label and regression, from a local table
(CSV/TSV/JSON Lines) or a tensorflow-datasets source, tokenised into `Features`.

The finetune trainer calls `load_classification(config, tokenizer)` and feeds the splits of
the `TaskData` it returns to `batching.batches`; `TaskData.labels` becomes the model's
`id2label` and `problem_type` its `problem_type`. The label map is, in this order: the one
given in the config, the class names of a tfds class-label column (the dataset's own ids,
as transformers' run_glue takes them), or the training split's labels sorted (numerically
when they are all integers). Labels of the eval split must be in it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bert_jax.data.batching import Features, TaskData
from bert_jax.data.encoding import encode
from bert_jax.data.finetune_files import Record, read_table
from bert_jax.data.tfds_source import read_tfds
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# The text columns of each GLUE task in tensorflow-datasets (transformers' run_glue task_to_keys).
GLUE_TEXT_COLUMNS = {"cola": ("sentence", None), "sst2": ("sentence", None),
                     "mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
                     "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
                     "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
                     "wnli": ("sentence1", "sentence2"), "ax": ("premise", "hypothesis")}


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """Where the examples are and which columns hold the texts and labels."""

    train: str | None = None  # a .csv/.tsv/.jsonl file, or a split name when `tfds` is set
    eval: str | None = None
    tfds: str | None = None  # a tensorflow-datasets name, e.g. glue/mnli
    tfds_data_dir: str | None = None
    text_column: str | None = None  # default for GLUE: GLUE_TEXT_COLUMNS
    text_pair_column: str | None = None
    label_column: str | list[str] = "label"  # several 0/1 columns: multi-label, one per label
    # PROBLEM_TYPES; default: multi-label for several label columns or list values,
    # regression for float values, else single-label
    problem_type: str | None = None
    labels: list[str] | None = None  # the label map, in id order
    max_seq_length: int = 128
    # train on packed rows of max_seq_length (data/packing.py); train.batch_size then counts rows
    pack: bool = False


@dataclasses.dataclass(frozen=True)
class TextExample:
    text: str
    text_pair: str | None
    label: Any  # as read: a str, number or list (JSON, tfds), or the label names of 0/1 columns
    where: str


def load_classification(config: ClassificationData, tokenizer: Tokenizer) -> TaskData:
    """Both splits read, checked against one label map and tokenised."""
    if config.train is None and config.labels is None:
        raise BertJaxError("data: without a train split, give the label map as `labels`")
    train, classes = read_examples(config, config.train) if config.train else ([], {})
    problem_type = config.problem_type or _problem_type(train)
    if problem_type not in PROBLEM_TYPES:
        raise BertJaxError(f"data.problem_type: {problem_type!r} is not one of "
                           f"{', '.join(PROBLEM_TYPES)}")
    labels = tuple(config.labels or label_map(train, problem_type, config.label_column, classes))

    def encode(examples: list[TextExample]) -> Features:
        return encode_classification(examples, tokenizer, labels, problem_type,
                                     config.max_seq_length)

    return TaskData(encode(train) if config.train else None,
                    encode(read_examples(config, config.eval)[0]) if config.eval else None,
                    labels, problem_type)


def read_examples(config: ClassificationData, split: str
                  ) -> tuple[list[TextExample], dict[str, list[str]]]:
    """The examples of `split` (a file, or a tfds split) and the tfds class names by column."""
    if config.tfds:
        records, classes = read_tfds(config.tfds, split, config.tfds_data_dir)
    else:
        records, classes = read_table(split), {}
    text_column, pair_column = config.text_column, config.text_pair_column
    if text_column is None:
        task = (config.tfds or "").removeprefix("glue/")
        if not (config.tfds or "").startswith("glue/") or task not in GLUE_TEXT_COLUMNS:
            raise BertJaxError("data.text_column: required (the column with the text)")
        text_column, pair_column = GLUE_TEXT_COLUMNS[task]
    return [TextExample(record.text(text_column),
                        None if pair_column is None else record.text(pair_column),
                        _label(record, config.label_column), record.where)
            for record in records], classes


def label_map(examples: list[TextExample], problem_type: str, label_column: str | list[str],
              classes: dict[str, list[str]]) -> list[str]:
    """The label names in id order when the config gives none (see the module docstring)."""
    if problem_type == "regression":
        return ["LABEL_0"]  # one output, named as transformers names it
    if isinstance(label_column, list):
        return list(label_column)
    if label_column in classes:
        return classes[label_column]
    names = {name for example in examples for name in _names(example.label)}
    numeric = all(name.lstrip("-").isdigit() for name in names)
    return sorted(names, key=int if numeric else None)


def encode_classification(examples: list[TextExample], tokenizer: Tokenizer,
                          labels: tuple[str, ...], problem_type: str,
                          max_seq_length: int) -> Features:
    """Token ids of each text (or text pair, truncated longest first as transformers'
    `truncation=True`) and the labels: class ids, multi-hot rows or regression targets."""
    encodings = encode(tokenizer, [e.text for e in examples], [e.text_pair for e in examples],
                       max_length=max_seq_length)
    ids = {name: i for i, name in enumerate(labels)}

    def label_ids(e: TextExample) -> list[int]:
        names = _names(e.label)
        if problem_type == "single_label_classification" and isinstance(e.label, list):
            raise BertJaxError(f"{e.where}: a list of labels, where problem_type is "
                               "single_label_classification")
        unknown = next((name for name in names if name not in ids), None)
        if unknown is not None:
            raise BertJaxError(f"{e.where}: label {unknown!r} is not in the label map "
                               f"({', '.join(labels)})")
        return [ids[name] for name in names]

    if problem_type == "regression":
        targets = np.array([_float(e.label, e.where) for e in examples], np.float32)
    elif problem_type == "multi_label_classification":
        targets = np.zeros((len(examples), len(labels)), np.float32)
        for row, e in enumerate(examples):
            targets[row, label_ids(e)] = 1
    else:
        targets = np.array([label_ids(e)[0] for e in examples], np.int32)
    return Features.from_encodings(encodings, targets)


def _label(record: Record, column: str | list[str]):
    if not isinstance(column, list):
        return record.get(column)
    for name in column:  # one 0/1 column per label
        if record.get(name) not in (0, 1, "0", "1"):
            raise BertJaxError(f"{record.where}: column {name!r} holds {record.get(name)!r}, "
                               "not 0 or 1")
    return [name for name in column if record.get(name) in (1, "1")]


def _names(label) -> list[str]:
    return [str(name) for name in label] if isinstance(label, list) else [str(label)]


def _problem_type(examples: list[TextExample]) -> str:
    if any(isinstance(e.label, list) for e in examples):
        return "multi_label_classification"
    if examples and all(isinstance(e.label, float) for e in examples):
        return "regression"
    return "single_label_classification"


def _float(value, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BertJaxError(f"{where}: label {value!r} is not a number (problem_type "
                           "regression)") from None
