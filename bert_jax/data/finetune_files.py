"""Local fine-tuning files: tables (CSV, TSV, JSON Lines) and CoNLL column files.

Both readers keep where each record came from (`path:line`), so that a bad value found later
(a label not in the label map, a missing column) is reported at its line. The trainer does
not call this module itself: `load_classification` and `load_token_classification` do.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from bert_jax.errors import BertJaxError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example as read: column name -> value, and where it came from (for errors)."""

    values: dict[str, Any]
    where: str

    def get(self, column: str):
        if column not in self.values:
            raise BertJaxError(f"{self.where}: no column {column!r} "
                               f"(columns: {', '.join(map(str, self.values))})")
        value = self.values[column]
        if value is None:
            raise BertJaxError(f"{self.where}: no value in column {column!r}")
        return value

    def text(self, column: str) -> str:
        text = self.get(column)
        if not isinstance(text, str):
            raise BertJaxError(f"{self.where}: column {column!r} holds {text!r}, not text")
        return text


@dataclasses.dataclass(frozen=True)
class TaggedSentence:
    """One sentence of a tagging dataset, from `source`: a CoNLL file with one token a line
    from `line` on, or (`line` None) a record (JSON Lines, tensorflow-datasets) holding it all."""

    tokens: list[str]
    tags: list[str]
    source: str
    line: int | None = None

    def where(self, index: int | None = None) -> str:
        """Where the sentence, or its token `index`, is."""
        if self.line is not None:
            return f"{self.source}:{self.line + (index or 0)}"
        return self.source + ("" if index is None else
                              f", token {index + 1} ({self.tokens[index]!r})")


def read_table(path: str | Path) -> list[Record]:
    """The rows of a CSV or TSV file with a header line, or the objects of a JSON Lines file.

    TSV is read without quoting, as GLUE's TSV files need (their text holds bare quotes).
    """
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise BertJaxError(f"{path}: expected a {', '.join(TABLE_SUFFIXES)} file")
    lines = _text(path)
    records = _jsonl(lines, path) if path.suffix == ".jsonl" else _csv(lines, path)
    if not records:
        raise BertJaxError(f"{path}: no examples (empty file)")
    return records


def read_conll(path: str | Path, token_column: int = 0, tag_column: int = -1
               ) -> list[TaggedSentence]:
    """The sentences of a CoNLL column file: one token a line, columns separated by spaces or
    tabs, a blank line (or a `-DOCSTART-` line) between sentences. Every line must have the
    number of columns of the file's first token line."""
    sentences, tokens, tags, first, width = [], [], [], 0, None
    for number, line in enumerate(_text(Path(path)), 1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                sentences.append(TaggedSentence(tokens, tags, str(path), first))
            tokens, tags = [], []
            continue
        width = width or len(columns)
        if len(columns) != width:
            raise BertJaxError(f"{path}:{number}: malformed line: {len(columns)} columns where "
                               f"the file has {width} ({line.strip()!r})")
        if not (-width <= token_column < width and -width <= tag_column < width):
            raise BertJaxError(f"{path}:{number}: no column {token_column} or {tag_column} "
                               f"(the lines have {width})")
        first = first if tokens else number
        tokens.append(columns[token_column])
        tags.append(columns[tag_column])
    if tokens:
        sentences.append(TaggedSentence(tokens, tags, str(path), first))
    if not sentences:
        raise BertJaxError(f"{path}: no sentences (empty file)")
    return sentences


def _text(path: Path) -> io.StringIO:
    """The file's text, to read line by line (newlines kept as they are, as csv needs)."""
    try:
        return io.StringIO(path.read_text(encoding="utf-8"), newline="")
    except OSError as err:
        raise BertJaxError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise BertJaxError(f"{path}: not UTF-8 text") from None


def _csv(lines: io.StringIO, path: Path) -> list[Record]:
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    reader = csv.DictReader(lines, **dialect)
    return [Record(row, f"{path}:{reader.line_num}") for row in reader]


def _jsonl(lines: io.StringIO, path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as err:
            raise BertJaxError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(values, dict):
            raise BertJaxError(f"{path}:{number}: expected a JSON object, got {line.strip()!r}")
        records.append(Record(values, f"{path}:{number}"))
    return records
