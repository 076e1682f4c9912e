"""Plain-text corpora -> tokenized ArrayRecord shards, for `bert-jax prepare-data`.

One input file is one unit of work, run in a process pool, with shards of its own, so files
are independent and a stopped run can go on where it was. A file's shards are written under
temporary names, renamed once the whole file is done, and count only when its done-record is
written (last, atomically); a rerun skips files that have one and clears what an interrupted
file left behind before doing it again.

Bad text is reported and skipped, one line per problem: a corpus of millions of lines should
not die on one bad byte. What makes the request itself wrong is fatal, before anything is
written: an input that does not exist, or an out_dir begun with another tokenizer or settings
(token ids of two vocabularies mixed would spoil training silently).

out_dir may be remote (gs://; the inputs and the tokenizer are local). ArrayRecord writes
local files only, so there a file's shards are written to a scratch directory and uploaded
when the file is done, in place of the rename (`bert_jax.files.publish`).

    out_dir/
      manifest.json                    shards with counts, totals, tokenizer hash, problems
      shards/<key>-00000.array_record  one record per document (`records.encode_document`)
      progress/settings.json           what the shards depend on, checked on every rerun
      progress/<key>.json              done-record of one input file (key: hash of its path)
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import tokenizers
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from bert_jax.data.records import encode_document
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.files import publish, read_json, scratch_dir
from bert_jax.version import __version__

DOC_MODES = ("blank-line", "line")
_BATCH_DOCUMENTS = 1000  # documents per encode_batch call
_LISTED_PROBLEMS = 20  # per file: a binary file must not print a million lines


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds. Shard paths are relative to out_dir, so it can be moved."""

    inputs: list[str]
    shards: list[dict]  # {"path", "documents", "sentences", "tokens"}
    documents: int
    sentences: int
    tokens: int
    tokenizer: dict  # {"file": "tokenizer.json" or "vocab.txt", "sha256": ...}
    doc_mode: str
    text_field: str
    bert_jax_version: str
    problems: list[str]


@dataclasses.dataclass(frozen=True)
class _Task:
    """One input file's work, picklable for the process pool."""

    path: str
    key: str
    out_dir: str
    tokenizer_dir: str
    tokenizer_sha256: str
    doc_mode: str
    text_field: str
    records_per_shard: int
    max_line_chars: int


def prepare_corpus(inputs: list[str], out_dir: str | os.PathLike, tokenizer_dir: str | Path, *,
                   doc_mode: str = "blank-line", text_field: str = "text",
                   records_per_shard: int = 50_000, workers: int | None = None,
                   max_line_chars: int = 100_000, progress: bool = True) -> Manifest:
    """Tokenize `inputs` (paths or glob patterns) into ArrayRecord shards under `out_dir`.

    Files ending in `.jsonl` (optionally `.gz`, like any input) hold one document per record,
    its `text_field` split into sentences at line breaks; other files are plain text: in
    "blank-line" mode (the BERT recipe's format) documents are separated by blank lines and
    each line is a sentence, in "line" mode each line is a one-sentence document. Sentences are
    tokenized without special tokens; empty sentences and documents are dropped.

    `workers` processes (default min(4, CPUs)) take one file each; 1 runs in this process.
    They are spawned, so a script calling this needs the usual `if __name__ == "__main__":`.
    Problems with the text are printed to stderr as each file is done and listed in the manifest.
    Returns the manifest, also written to `out_dir/manifest.json`.
    """
    if records_per_shard < 1:
        raise BertJaxError(f"records_per_shard must be at least 1, not {records_per_shard}")
    if doc_mode not in DOC_MODES:
        raise BertJaxError(f"doc_mode {doc_mode!r}: expected one of {', '.join(DOC_MODES)}")
    files = _expand(inputs)
    load_tokenizer(tokenizer_dir)  # a bad tokenizer directory fails here, before any output
    out = epath.Path(out_dir)
    settings = {"tokenizer": _tokenizer_identity(Path(tokenizer_dir)), "doc_mode": doc_mode,
                "text_field": text_field, "max_line_chars": max_line_chars}
    _check_settings(out, settings)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "progress").mkdir(exist_ok=True)
    _write_json(out / "progress" / "settings.json", settings)

    tasks = [_Task(path, _key(path), str(out), str(tokenizer_dir),
                   settings["tokenizer"]["sha256"], doc_mode, text_field, records_per_shard,
                   max_line_chars) for path in files]
    records = {task.key: _done_record(task) for task in tasks}
    todo = [task for task in tasks if records[task.key] is None]
    with tqdm(total=len(tasks), unit="file", disable=not progress) as file_bar, \
            tqdm(unit="doc", disable=not progress) as doc_bar:
        file_bar.update(len(tasks) - len(todo))
        doc_bar.update(sum(s["documents"] for r in records.values() if r for s in r["shards"]))

        def finished(task: _Task, record: dict) -> None:
            records[task.key] = record
            file_bar.update()
            for problem in record["problems"]:
                tqdm.write(problem, file=sys.stderr)

        _run(todo, workers or min(4, os.cpu_count() or 1), doc_bar.update, finished)

    shards = [shard for task in tasks for shard in records[task.key]["shards"]]
    manifest = Manifest(
        inputs=files, shards=shards,
        documents=sum(s["documents"] for s in shards),
        sentences=sum(s["sentences"] for s in shards),
        tokens=sum(s["tokens"] for s in shards),
        tokenizer=settings["tokenizer"], doc_mode=doc_mode, text_field=text_field,
        bert_jax_version=__version__,
        problems=[p for task in tasks for p in records[task.key]["problems"]])
    if not manifest.documents:
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        raise BertJaxError(f"no documents found in {', '.join(files[:3])}{more}")
    _write_json(out / "manifest.json", dataclasses.asdict(manifest))
    return manifest


def read_shards(out_dir: str | os.PathLike) -> list[str]:
    """The shard paths listed in out_dir's manifest, checked to exist (for the Grain sources,
    which read gs:// URLs themselves)."""
    path = epath.Path(out_dir) / "manifest.json"
    shards = read_json(path).get("shards")
    if not isinstance(shards, list):
        raise BertJaxError(f"{path}: no list of shards (not written by prepare-data?)")
    paths = [str(epath.Path(out_dir) / shard["path"]) for shard in shards]
    missing = [p for p in paths if not epath.Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BertJaxError(f"{missing[0]}: shard listed in {path} is missing{more}")
    return paths


def _expand(inputs: list[str]) -> list[str]:
    """The input files in the order given (each glob sorted), each once. A missing path or a
    glob that matches nothing is an error: a typo must not silently leave out part of a corpus."""
    files: dict[str, str] = {}
    for pattern in inputs:
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise BertJaxError(f"{pattern}: no files match")
        elif os.path.isdir(pattern):
            raise BertJaxError(f"{pattern}: is a directory (give a glob such as {pattern}/*.txt)")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise BertJaxError(f"{pattern}: no such file")
        for path in matches:
            files.setdefault(os.path.realpath(path), path)
    if not files:
        raise BertJaxError("no input files given")
    return list(files.values())


def _key(path: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:16]


def _tokenizer_identity(tokenizer_dir: Path) -> dict:
    """sha256 of the file the ids come from, so shards can be matched to a model with sha256sum."""
    candidates = [tokenizer_dir / "tokenizer.json", tokenizer_dir / "vocab.txt",
                  *sorted(tokenizer_dir.glob("*.model"))]  # load_tokenizer's order
    path = next(p for p in candidates if p.is_file())
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _check_settings(out: epath.Path, settings: dict) -> None:
    """Refuse an out_dir begun with another tokenizer or settings: its shards would not match."""
    path = out / "progress" / "settings.json"
    if not path.is_file():
        return
    before = read_json(path)
    changed = [f"{name} {json.dumps(before.get(name))} (now {json.dumps(value)})"
               for name, value in settings.items() if before.get(name) != value]
    if changed:
        raise BertJaxError(f"{out}: was prepared with {'; '.join(changed)}; refusing to mix "
                           "shards (use a new out_dir or delete this one)")


def _done_record(task: _Task) -> dict | None:
    """The file's done-record if it still describes the file and its shards are there."""
    out = epath.Path(task.out_dir)
    path = out / "progress" / f"{task.key}.json"
    if not path.is_file():
        return None
    record, stat = read_json(path), os.stat(task.path)
    unchanged = (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
    return record if unchanged and all((out / s["path"]).is_file() for s in record["shards"]) \
        else None


def _ignore(count: int) -> None:
    pass


_report_documents: Callable[[int], object] = _ignore  # how a running file reports progress


def _run(tasks: list[_Task], workers: int, report: Callable[[int], object],
         finished: Callable[[_Task, dict], None]) -> None:
    """Runs the tasks in this process for one worker (simple to debug), else in a spawn pool:
    fork is unsafe once JAX or the tokenizers' threads may be running."""
    global _report_documents
    if min(workers, len(tasks)) <= 1:
        _report_documents = report
        try:
            for task in tasks:
                finished(task, _prepare_file(task))
        finally:
            _report_documents = _ignore
        return
    context = multiprocessing.get_context("spawn")
    counter, shown = context.Value("q", 0), 0
    with ProcessPoolExecutor(min(workers, len(tasks)), context, initializer=_count_documents_in,
                             initargs=(counter,)) as pool:
        pending = {pool.submit(_prepare_file, task): task for task in tasks}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                count = counter.value
                report(count - shown)
                shown = count
                for future in done:
                    finished(pending.pop(future), future.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # running files still finish and are kept
            raise


def _count_documents_in(counter) -> None:
    """Pool initializer: workers add their documents to a counter the parent shows."""
    global _report_documents

    def report(count: int) -> None:
        with counter.get_lock():
            counter.value += count

    _report_documents = report


def _prepare_file(task: _Task) -> dict:
    """Tokenizes one input file into its own shards and commits them with its done-record."""
    out, stat = epath.Path(task.out_dir), os.stat(task.path)
    (out / "progress" / f"{task.key}.json").unlink(missing_ok=True)
    for leftover in (out / "shards").glob(f"{task.key}-*"):
        leftover.unlink()
    problems = _Problems(task.path)
    shards, writer = [], None
    with scratch_dir(out) as local:
        (local / "shards").mkdir(exist_ok=True)
        try:
            backend = _backend(task.tokenizer_dir, task.tokenizer_sha256)
            for documents in _encoded(_documents(task, problems), backend):
                for document in documents:
                    if writer is None or shards[-1]["documents"] == task.records_per_shard:
                        if writer is not None:
                            writer.close()
                        shards.append({"path": f"shards/{task.key}-{len(shards):05d}.array_record",
                                       "documents": 0, "sentences": 0, "tokens": 0})
                        writer = ArrayRecordWriter(str(local / f"{shards[-1]['path']}.tmp"),
                                                   "group_size:1")
                    writer.write(encode_document(document))
                    shards[-1]["documents"] += 1
                    shards[-1]["sentences"] += len(document)
                    shards[-1]["tokens"] += sum(map(len, document))
                _report_documents(len(documents))
        finally:
            if writer is not None:
                writer.close()
        for shard in shards:
            publish(local / f"{shard['path']}.tmp", out / shard["path"])
    if not shards:
        problems.add(None, "empty file, skipped" if stat.st_size == 0 else "no documents, skipped")
    record = {"input": task.path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "shards": shards, "problems": problems.lines()}
    _write_json(out / "progress" / f"{task.key}.json", record)
    return record


@lru_cache(maxsize=1)
def _backend(tokenizer_dir: str, sha256: str) -> tokenizers.Tokenizer:
    """The model's tokenizer (cached per process, keyed by content) with length limits off: a
    saved tokenizer.json may truncate or pad to 512, and every sentence must stay whole."""
    backend = load_tokenizer(tokenizer_dir).backend
    backend.no_truncation()
    backend.no_padding()
    return backend


def _encoded(documents: Iterable[list[str]],
             backend: tokenizers.Tokenizer) -> Iterator[list[list[list[int]]]]:
    """Batches of tokenized documents, one encode_batch call each. Sentences that encode to
    nothing (e.g. only characters the normalizer removes) and then empty documents are dropped."""
    documents = iter(documents)
    while batch := list(islice(documents, _BATCH_DOCUMENTS)):
        sentences = [sentence for document in batch for sentence in document]
        ids = iter(e.ids for e in backend.encode_batch_fast(sentences, add_special_tokens=False))
        encoded = ([s for s in (next(ids) for _ in document) if s] for document in batch)
        yield [document for document in encoded if document]


def _documents(task: _Task, problems: _Problems) -> Iterator[list[str]]:
    """The file's documents, each a list of sentences (see `prepare_corpus`)."""
    lines = _lines(task.path, task.max_line_chars, problems)
    if task.path.removesuffix(".gz").endswith(".jsonl"):
        for number, line in lines:
            if line.strip():
                text = _json_text(line, task.text_field)
                if text is None:
                    problems.add(number, f"not a JSON object with a string {task.text_field!r}, "
                                         "line skipped")
                else:
                    yield [s.strip() for s in text.split("\n") if s.strip()]
    elif task.doc_mode == "line":
        for _, line in lines:
            if line.strip():
                yield [line.strip()]
    else:
        document = []
        for _, line in lines:
            if line.strip():
                document.append(line.strip())
            elif document:
                yield document
                document = []
        if document:
            yield document


def _json_text(line: str, field: str) -> str | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    text = record.get(field) if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def _lines(path: str, max_chars: int, problems: _Problems) -> Iterator[tuple[int, str]]:
    """(number, text) of each line that is UTF-8 and at most max_chars long; others are problems.

    Read as bytes with a length limit, so a bad byte costs one line, not the file, and a
    gigabyte "line" (a binary file, a minified dump) is never held in memory. A file that
    cannot be read on (a truncated .gz) keeps the lines before.
    """
    limit = 4 * max_chars + 2  # UTF-8 takes at most 4 bytes a character, then "\r\n"
    number = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as file:
            while raw := file.readline(limit):
                number += 1
                if len(raw) == limit and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):
                        raw = file.readline(limit)
                    problems.add(number, f"line longer than {max_chars} characters, skipped")
                    continue
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    problems.add(number, f"not UTF-8 (byte {err.start + 1} of the line), "
                                         "line skipped")
                    continue
                if len(line) > max_chars:
                    problems.add(number, f"line longer than {max_chars} characters, skipped")
                    continue
                yield number, line.removeprefix("\ufeff") if number == 1 else line
    except (OSError, EOFError, zlib.error) as err:
        after = f" after line {number}" if number else ""
        problems.add(None, f"cannot be read{after} ({err}), rest skipped")


class _Problems:
    """One file's problems as 'path:line: message'; past _LISTED_PROBLEMS only counted."""

    def __init__(self, path: str):
        self.path, self.listed, self.unlisted = path, [], 0

    def add(self, number: int | None, message: str) -> None:
        if len(self.listed) < _LISTED_PROBLEMS:
            where = self.path if number is None else f"{self.path}:{number}"
            self.listed.append(f"{where}: {message}")
        else:
            self.unlisted += 1

    def lines(self) -> list[str]:
        more = [f"{self.path}: {self.unlisted} more problems not listed"] if self.unlisted else []
        return self.listed + more


def _write_json(path: epath.Path, data: dict) -> None:
    """Write through a temporary file and a rename (on GCS a copy; an object appears whole):
    a crash never leaves half a JSON file."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)
