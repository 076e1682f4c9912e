"""Extractive question answering data: SQuAD v1.1 / v2.0 examples, and model features made
as `transformers`' run_qa.py makes them (prepare_train_features / prepare_validation_features).

A context longer than the model's window is cut into overlapping windows (`doc_stride` tokens
of overlap), each a feature: the question, then one window of the context. A feature's
training target is the answer's first and last token, or its CLS token when the example has
no answer (SQuAD 2.0 `is_impossible`) or the answer is not wholly inside that window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from bert_jax.data.encoding import encode
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.files import read_json


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question about one context; no answers means unanswerable (SQuAD 2.0)."""

    id: str
    question: str
    context: str
    answers: tuple[Answer, ...] = ()

    def __post_init__(self):
        for a in self.answers:
            end = a.start + len(a.text)
            if not a.text or a.start < 0 or self.context[a.start:end] != a.text:
                found = self.context[a.start:end] if 0 <= a.start < len(self.context) else ""
                raise BertJaxError(
                    f"question {self.id!r}: answer {a.text!r} at character {a.start} is not in its "
                    f"context (context[{a.start}:{end}] is {found!r}, context length "
                    f"{len(self.context)})")


@dataclasses.dataclass(frozen=True)
class QAFeature:
    """One window of an example, tokenised (unpadded)."""

    example_index: int  # into the examples given to `prepare_features`
    encoding: tokenizers.Encoding  # ids, type_ids, offsets, sequence_ids, word alignment
    cls_index: int
    start_position: int  # training target: a token index, cls_index when there is no answer
    end_position: int

    @property
    def context_offsets(self) -> list[tuple[int, int] | None]:
        """Each token's character span in the context; None for question and special tokens
        (run_qa's validation `offset_mapping`)."""
        return [offsets if seq == 1 else None
                for offsets, seq in zip(self.encoding.offsets, self.encoding.sequence_ids)]


def read_squad(path: str | Path) -> list[QAExample]:
    """The questions of a SQuAD v1.1 or v2.0 JSON file, in file order."""
    data = read_json(path).get("data")
    if not isinstance(data, list):
        raise BertJaxError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    examples = []
    try:
        for article in data:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = () if qa.get("is_impossible", False) else tuple(
                        Answer(a["text"], a["answer_start"]) for a in qa["answers"])
                    examples.append(QAExample(str(qa["id"]), qa["question"],
                                              paragraph["context"], answers))
    except (KeyError, TypeError) as err:
        raise BertJaxError(f"{path}: not a SQuAD file (missing or malformed field {err})") from None
    except BertJaxError as err:
        raise BertJaxError(f"{path}: {err}") from None
    return examples


def example_from_record(record: dict[str, Any]) -> QAExample:
    """A row as the Hugging Face `squad` datasets and tensorflow-datasets give it:
    {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}."""
    answers = record["answers"]
    return QAExample(str(record["id"]), record["question"], record["context"],
                     tuple(Answer(t, int(s)) for t, s in zip(answers["text"],
                                                             answers["answer_start"])))


def prepare_features(examples: Sequence[QAExample], tokenizer: Tokenizer, *,
                     max_length: int = 384, doc_stride: int = 128) -> list[QAFeature]:
    """Every window of every example, in order (question first, leading spaces stripped).

    The target is the example's first answer, as run_qa.py trains on.
    """
    encodings = encode(tokenizer, [e.question.lstrip() for e in examples],
                       [e.context for e in examples], max_length=max_length,
                       truncation="only_second", stride=doc_stride)
    features = []
    for index, (example, first) in enumerate(zip(examples, encodings)):
        for encoding in (first, *first.overflowing):
            cls_index = next((i for i, special in enumerate(encoding.special_tokens_mask)
                              if special), 0)
            start, end = _answer_tokens(encoding, example.answers[:1])
            features.append(QAFeature(index, encoding, cls_index,
                                      cls_index if start is None else start,
                                      cls_index if end is None else end))
    return features


def _answer_tokens(encoding: tokenizers.Encoding,
                   answers: tuple[Answer, ...]) -> tuple[int | None, int | None]:
    """The first and last context token of the answer, or (None, None) when there is no
    answer or it is not wholly inside this window."""
    if not answers:
        return None, None
    start_char = answers[0].start
    end_char = start_char + len(answers[0].text)
    context = [i for i, seq in enumerate(encoding.sequence_ids) if seq == 1]
    offsets = encoding.offsets
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None, None
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end
