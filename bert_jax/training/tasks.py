"""What each fine-tuning task is to the finetune trainer: its recipe `data:` section, the model
head it trains, its batches, and how its evaluation is scored.

A task's section is its data module's config plus `task`, the key that picks it in a recipe.
`prepare(tokenizer)` reads and tokenises both splits into a `Prepared`: the examples for
`batching.batches`, a `model_batch` that turns such a batch into the model's inputs, and a
`score` that turns the eval split's outputs into metrics, the model's own loss included
(`eval_loss`: the loss of the whole split as one batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax.numpy as jnp
import numpy as np

from bert_jax.data.answer_spans import squad_predictions
from bert_jax.data.batching import Features
from bert_jax.data.classification import ClassificationData, load_classification
from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.multiple_choice import MultipleChoiceData, choice_batch, load_multiple_choice
from bert_jax.data.squad import QAExample, example_from_record, prepare_features, read_squad
from bert_jax.data.tfds_source import read_tfds
from bert_jax.data.token_classification import (
    TokenClassificationData,
    load_token_classification,
)
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling import losses
from bert_jax.training.metrics import (
    compute_metrics,
    metric_names,
    predictions_from_logits,
    squad_metrics,
    token_classification_metrics,
)

Outputs = dict[str, list[np.ndarray]]  # output name -> one array per eval example, in order


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A task's data, read and tokenised, and what the trainer does with it."""

    train: Features | None
    eval: Features | None
    labels: tuple[str, ...] | None  # the model's id2label; None: the task has no label names
    problem_type: str | None
    metrics: tuple[str, ...]  # what `score` reports besides "loss", the headline first
    score: Callable[[Outputs], dict[str, float]]
    outputs: tuple[str, ...] = ("logits",)  # the model outputs `score` reads
    # a batch of the "train" or "eval" examples -> the model's inputs (labels included)
    model_batch: Callable[[dict, str], dict] = lambda batch, split: batch
    num_labels: int | None = None  # the head's outputs, when not len(labels)


@dataclasses.dataclass(frozen=True)
class ClassificationTask(ClassificationData):
    """Sequence classification: single-label, multi-label or regression."""

    HEAD: ClassVar[str] = "ForSequenceClassification"
    task: str = "classification"

    def prepare(self, tokenizer: Tokenizer) -> Prepared:
        data = load_classification(self, tokenizer)
        glue = self.tfds if (self.tfds or "").startswith("glue/") else None
        names = metric_names(data.problem_type, len(data.labels), glue)

        def score(outputs: Outputs) -> dict[str, float]:
            logits, labels = np.stack(outputs["logits"]), data.eval.labels
            loss = losses.sequence_classification_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                       data.problem_type)
            predictions = predictions_from_logits(logits, data.problem_type)
            return {"loss": float(loss), **compute_metrics(names, predictions, labels)}

        return Prepared(data.train, data.eval, data.labels, data.problem_type, names, score)


@dataclasses.dataclass(frozen=True)
class TokenClassificationTask(TokenClassificationData):
    """Token classification (NER), scored by seqeval's entity-level F1."""

    HEAD: ClassVar[str] = "ForTokenClassification"
    task: str = "token_classification"

    def prepare(self, tokenizer: Tokenizer) -> Prepared:
        data = load_token_classification(self, tokenizer)
        scheme = "BIOES" if any(label[:2] in ("S-", "E-") for label in data.labels) else "IOB2"

        def score(outputs: Outputs) -> dict[str, float]:
            logits = _stack(outputs["logits"], 0.0)
            labels = _stack(data.eval.labels, IGNORE_INDEX, logits.shape[1])
            loss = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
            metrics = token_classification_metrics(logits.argmax(-1), labels, data.labels,
                                                   scheme=scheme)
            return {"loss": float(loss), **metrics}

        return Prepared(data.train, data.eval, data.labels, None,
                        ("f1", "precision", "recall", "accuracy"), score)


@dataclasses.dataclass(frozen=True)
class QuestionAnsweringTask:
    """Extractive QA on SQuAD v1.1 / v2.0 files or tensorflow-datasets (`squad/v1.1`,
    `squad/v2.0`), with run_qa.py's windows and scoring (exact match and F1)."""

    HEAD: ClassVar[str] = "ForQuestionAnswering"
    task: str = "question_answering"
    train: str | None = None  # a SQuAD JSON file, or a split name when `tfds` is set
    eval: str | None = None
    tfds: str | None = None
    tfds_data_dir: str | None = None
    max_seq_length: int = 384
    doc_stride: int = 128
    max_answer_length: int = 30
    # SQuAD 2.0 scoring (an empty answer when no span beats the null score by the threshold);
    # default: when some eval question has no answer
    version_2_with_negative: bool | None = None
    null_score_diff_threshold: float = 0.0

    def read(self, split: str) -> list[QAExample]:
        if not self.tfds:
            return read_squad(split)
        records, _ = read_tfds(self.tfds, split, self.tfds_data_dir)
        try:
            return [example_from_record({**record.values,
                                         "answers": _answers(record.values["answers"])})
                    for record in records]
        except BertJaxError as err:
            raise BertJaxError(f"{self.tfds}[{split}]: {err}") from None

    def prepare(self, tokenizer: Tokenizer) -> Prepared:
        if self.doc_stride >= self.max_seq_length:
            raise BertJaxError(f"data.doc_stride ({self.doc_stride}) must be less than "
                               f"data.max_seq_length ({self.max_seq_length})")

        def features(split: str | None):
            if split is None:
                return [], [], None
            examples = self.read(split)
            windows = prepare_features(examples, tokenizer, max_length=self.max_seq_length,
                                       doc_stride=self.doc_stride)
            return examples, windows, Features.from_encodings(
                [w.encoding for w in windows],
                np.array([[w.start_position, w.end_position] for w in windows], np.int32))

        train = features(self.train)[2]
        examples, windows, eval_features = features(self.eval)
        negative = self.version_2_with_negative
        if negative is None:
            negative = any(not e.answers for e in examples)

        def score(outputs: Outputs) -> dict[str, float]:
            start = _stack(outputs["start_logits"], -np.inf)  # -inf: no probability
            end = _stack(outputs["end_logits"], -np.inf)
            targets = eval_features.labels
            loss = losses.span_loss(jnp.asarray(start), jnp.asarray(end),
                                    jnp.asarray(targets[:, 0]), jnp.asarray(targets[:, 1]))
            predictions = squad_predictions(
                examples, windows, outputs["start_logits"], outputs["end_logits"],
                max_answer_length=self.max_answer_length, version_2_with_negative=negative,
                null_score_diff_threshold=self.null_score_diff_threshold)
            metrics = squad_metrics(examples, predictions)
            return {"loss": float(loss), **{k: v for k, v in metrics.items()
                                            if not k.endswith("total")}}

        return Prepared(train, eval_features, None, None, ("f1", "exact_match"), score,
                        outputs=("start_logits", "end_logits"), model_batch=span_positions,
                        num_labels=2)


def span_positions(batch: dict, split: str) -> dict:
    """A QA batch's `[B, 2]` answer spans as the model's start_positions / end_positions."""
    positions = batch.pop("labels")
    return {**batch, "start_positions": positions[:, 0], "end_positions": positions[:, 1]}


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask(MultipleChoiceData):
    """Multiple choice (SWAG-style), scored by accuracy."""

    HEAD: ClassVar[str] = "ForMultipleChoice"
    task: str = "multiple_choice"

    def prepare(self, tokenizer: Tokenizer) -> Prepared:
        splits = {split: load_multiple_choice(self, tokenizer, path)
                  for split, path in (("train", self.train), ("eval", self.eval)) if path}

        def model_batch(batch: dict, split: str) -> dict:
            return choice_batch(batch, splits[split], tokenizer.pad_token_id)

        def score(outputs: Outputs) -> dict[str, float]:
            logits, labels = np.stack(outputs["logits"]), splits["eval"].examples.labels
            loss = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
            return {"loss": float(loss), **compute_metrics(("accuracy",), logits.argmax(-1),
                                                           labels)}

        examples = {split: features.examples for split, features in splits.items()}
        return Prepared(examples.get("train"), examples.get("eval"), None, None, ("accuracy",),
                        score, model_batch=model_batch)


TASKS = (ClassificationTask, TokenClassificationTask, QuestionAnsweringTask, MultipleChoiceTask)
TaskSection = ClassificationTask | TokenClassificationTask | QuestionAnsweringTask | \
    MultipleChoiceTask


def _stack(rows: list[np.ndarray], fill: Any, length: int | None = None) -> np.ndarray:
    """Rows of different lengths (first dim) -> one array, right-padded with `fill` to the
    longest row (or `length`)."""
    length = length or max(len(row) for row in rows)
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, np.result_type(rows[0], fill))
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _answers(answers: dict) -> dict:
    """tensorflow-datasets' SQuAD answers (arrays of bytes and ints) as Python lists."""
    return {"text": [t.decode("utf-8") if isinstance(t, bytes) else str(t)
                     for t in answers["text"]],
            "answer_start": [int(s) for s in answers["answer_start"]]}
