"""Corpus preparation: text -> ArrayRecord shards, read back and compared with the tokenizer's
own encoding; bad input reported and skipped; restart, refusal and crash recovery."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import tokenizers
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from bert_jax.data import prepare
from bert_jax.data.prepare import prepare_corpus, read_shards
from bert_jax.data.records import decode_document
from bert_jax.data.train_tokenizer import train_wordpiece
from bert_jax.demo import CORPUS
from bert_jax.errors import BertJaxError

DOCS = [["Paris is the capital of France.", "Oslo is the capital of Norway."],
        ["The river flows through the city."],
        ["She reads a book in the library.", "Berlin is the capital of Germany.",
         "Stockholm is the capital of Sweden."]]
# Blank-line format with the awkward bits: blank runs, whitespace-only and \r\n lines.
BLANK_LINE_TEXT = ("Paris is the capital of France.\r\nOslo is the capital of Norway.\n\n \n\n"
                   "The river flows through the city.\n  \t\n"
                   "She reads a book in the library.\nBerlin is the capital of Germany.\n"
                   "Stockholm is the capital of Sweden.")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    return train_wordpiece(CORPUS, path, vocab_size=200, min_frequency=1)


def encode(tokenizer_dir, documents):
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [[backend.encode(s, add_special_tokens=False).ids for s in doc] for doc in documents]


def read_back(out_dir):
    documents = []
    for path in read_shards(out_dir):
        reader = ArrayRecordReader(path)
        documents += [[s.tolist() for s in decode_document(r)] for r in reader.read_all()]
        reader.close()
    return documents


def run(inputs, out_dir, tokenizer_dir, **kwargs):
    kwargs = {"workers": 1, "progress": False, **kwargs}
    return prepare_corpus([str(p) for p in inputs], out_dir, tokenizer_dir, **kwargs)


def test_blank_line_txt_and_manifest(tmp_path, tokenizer_dir):
    (tmp_path / "corpus.txt").write_text(BLANK_LINE_TEXT, encoding="utf-8")
    manifest = run([tmp_path / "corpus.txt"], tmp_path / "out", tokenizer_dir,
                   records_per_shard=2)
    expected = encode(tokenizer_dir, DOCS)
    assert read_back(tmp_path / "out") == expected
    assert [s["documents"] for s in manifest.shards] == [2, 1]
    assert manifest.documents == 3 and manifest.sentences == 6
    assert manifest.tokens == sum(len(s) for doc in expected for s in doc)
    assert manifest.problems == [] and manifest.doc_mode == "blank-line"
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["tokens"] == manifest.tokens and on_disk["tokenizer"]["file"] == "tokenizer.json"
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_line_mode_drops_empty_sentences(tmp_path, tokenizer_dir):
    # "\x01\x02" is removed by the BERT normalizer: it encodes to nothing and is dropped.
    (tmp_path / "lines.txt").write_text(BLANK_LINE_TEXT + "\n\x01\x02\n", encoding="utf-8")
    manifest = run([tmp_path / "lines.txt"], tmp_path / "out", tokenizer_dir, doc_mode="line")
    assert read_back(tmp_path / "out") == encode(tokenizer_dir, [[s] for d in DOCS for s in d])
    assert manifest.documents == manifest.sentences == 6


def test_jsonl_gz_and_text_field(tmp_path, tokenizer_dir):
    lines = [json.dumps({"body": "\n".join(doc), "id": i}) for i, doc in enumerate(DOCS)]
    lines.insert(1, json.dumps({"title": "no body"}))
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")
    manifest = run([tmp_path / "corpus.jsonl.gz"], tmp_path / "out", tokenizer_dir,
                   text_field="body")
    assert read_back(tmp_path / "out") == encode(tokenizer_dir, DOCS)
    assert manifest.problems == [f"{tmp_path / 'corpus.jsonl.gz'}:2: not a JSON object with a "
                                 "string 'body', line skipped"]


def test_gzipped_text_and_truncation_off(tmp_path, tokenizer_dir):
    # A tokenizer.json saved with truncation on must still give whole sentences.
    truncating = tmp_path / "truncating"
    truncating.mkdir()
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    backend.enable_truncation(3)
    backend.save(str(truncating / "tokenizer.json"))
    with gzip.open(tmp_path / "corpus.txt.gz", "wt", encoding="utf-8") as f:
        f.write(BLANK_LINE_TEXT)
    run([tmp_path / "corpus.txt.gz"], tmp_path / "out", truncating)
    assert read_back(tmp_path / "out") == encode(tokenizer_dir, DOCS)


def write_files(directory, count=3):
    directory.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        docs = DOCS[i:] + DOCS[:i]
        paths.append(directory / f"part{i}.txt")
        paths[-1].write_text("\n\n".join("\n".join(doc) for doc in docs), encoding="utf-8")
    return paths, [doc for i in range(count) for doc in DOCS[i:] + DOCS[:i]]


def test_glob_over_files_in_a_pool(tmp_path, tokenizer_dir):
    _, docs = write_files(tmp_path / "corpus")
    manifest = run([str(tmp_path / "corpus" / "*.txt")], tmp_path / "out", tokenizer_dir,
                   workers=2, records_per_shard=2)
    expected = encode(tokenizer_dir, docs)
    assert read_back(tmp_path / "out") == expected
    assert len(manifest.inputs) == 3 and len(manifest.shards) == 6
    assert manifest.documents == 9 and manifest.sentences == 18
    assert manifest.tokens == sum(len(s) for doc in expected for s in doc)


def test_bad_input_is_reported_and_skipped(tmp_path, tokenizer_dir, capsys):
    good, bad, empty, long = (tmp_path / f"{n}.txt" for n in ("good", "bad", "empty", "long"))
    good.write_text(BLANK_LINE_TEXT, encoding="utf-8")
    bad.write_bytes(b"Paris is the capital of France.\n\xff\xfe latin-1 \xe9\nOslo is here.\n")
    empty.write_bytes(b"")
    long.write_text("x" * 300 + "\n" + "y" * 60 + "\nThe river flows.\n", encoding="utf-8")
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(gzip.compress(b"Lost words.\n" * 10_000)[:100])
    manifest = run([good, bad, empty, long, truncated], tmp_path / "out", tokenizer_dir,
                   max_line_chars=50)
    # What a truncated .gz held before the cut is kept.
    kept = int(re.search(r"truncated.txt.gz: cannot be read after line (\d+) \(Compressed file "
                         r"ended", manifest.problems[-1])[1])
    expected = DOCS + [["Paris is the capital of France.", "Oslo is here."], ["The river flows."],
                       ["Lost words."] * kept]
    assert read_back(tmp_path / "out") == encode(tokenizer_dir, expected)
    assert manifest.problems[:-1] == [
        f"{bad}:2: not UTF-8 (byte 1 of the line), line skipped",
        f"{empty}: empty file, skipped",
        f"{long}:1: line longer than 50 characters, skipped",
        f"{long}:2: line longer than 50 characters, skipped"]
    assert capsys.readouterr().err.splitlines() == manifest.problems


def test_missing_input_is_fatal_before_any_output(tmp_path, tokenizer_dir):
    (tmp_path / "good.txt").write_text(BLANK_LINE_TEXT, encoding="utf-8")
    for missing in (tmp_path / "nope.txt", tmp_path / "*.nothing"):
        with pytest.raises(BertJaxError, match=str(missing).replace("*", r"\*")):
            run([tmp_path / "good.txt", missing], tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_no_documents_is_fatal_and_writes_no_manifest(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(BertJaxError, match="no documents found in .*empty.txt"):
        run([tmp_path / "empty.txt", tmp_path / "blank.txt"], tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out" / "manifest.json").exists()


def counting(monkeypatch):
    """Records which files `_prepare_file` is called for."""
    calls, real = [], prepare._prepare_file

    def wrapper(task):
        calls.append(task.path.rsplit("/", 1)[-1])
        return real(task)

    monkeypatch.setattr(prepare, "_prepare_file", wrapper)
    return calls


def done_record(out_dir, name):
    return next(p for p in (out_dir / "progress").glob("*.json")
                if json.loads(p.read_text()).get("input", "").endswith(name))


def test_restart_redoes_only_unfinished_files(tmp_path, tokenizer_dir, monkeypatch):
    paths, _ = write_files(tmp_path / "corpus")
    out = tmp_path / "out"
    run(paths, out, tokenizer_dir, records_per_shard=2)
    before = (out / "manifest.json").read_text()
    record = done_record(out, "part1.txt")
    for shard in json.loads(record.read_text())["shards"]:
        (out / shard["path"]).unlink()
    record.unlink()

    calls = counting(monkeypatch)
    run(paths, out, tokenizer_dir, records_per_shard=2)
    assert calls == ["part1.txt"]
    assert (out / "manifest.json").read_text() == before

    paths[2].write_text("Oslo is the capital of Norway.", encoding="utf-8")  # a changed input
    manifest = run(paths, out, tokenizer_dir, records_per_shard=2)
    assert calls == ["part1.txt", "part2.txt"]
    assert manifest.documents == 7


def test_other_tokenizer_is_refused(tmp_path, tokenizer_dir):
    (tmp_path / "corpus.txt").write_text(BLANK_LINE_TEXT, encoding="utf-8")
    run([tmp_path / "corpus.txt"], tmp_path / "out", tokenizer_dir)
    before = (tmp_path / "out" / "manifest.json").read_text()
    other = tmp_path / "other"
    other.mkdir()
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    backend.add_tokens(["Reykjavik"])
    backend.save(str(other / "tokenizer.json"))
    with pytest.raises(BertJaxError, match="was prepared with tokenizer .*refusing to mix"):
        run([tmp_path / "corpus.txt"], tmp_path / "out", other)
    with pytest.raises(BertJaxError, match="doc_mode"):
        run([tmp_path / "corpus.txt"], tmp_path / "out", tokenizer_dir, doc_mode="line")
    assert (tmp_path / "out" / "manifest.json").read_text() == before


def test_crash_mid_file_is_not_counted_and_rerun_completes(tmp_path, tokenizer_dir, monkeypatch):
    paths, docs = write_files(tmp_path / "corpus", count=2)
    out = tmp_path / "out"

    class CrashingWriter(ArrayRecordWriter):
        writes = 0

        def write(self, record):
            CrashingWriter.writes += 1
            if CrashingWriter.writes > 4:  # part0 (3 documents) completes, part1 does not
                raise RuntimeError("simulated crash")
            super().write(record)

    monkeypatch.setattr(prepare, "ArrayRecordWriter", CrashingWriter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(paths, out, tokenizer_dir, records_per_shard=1)
    assert not (out / "manifest.json").exists()
    records = [p for p in (out / "progress").glob("*.json") if p.name != "settings.json"]
    assert records == [done_record(out, "part0.txt")]
    committed = json.loads(records[0].read_text())["shards"]  # part1 left only .tmp files
    assert sorted(p.name for p in (out / "shards").glob("*.array_record")) == sorted(
        s["path"].split("/")[1] for s in committed)

    monkeypatch.undo()
    calls = counting(monkeypatch)
    manifest = run(paths, out, tokenizer_dir, records_per_shard=1)
    assert calls == ["part1.txt"]
    assert read_back(out) == encode(tokenizer_dir, docs)
    assert manifest.documents == len(manifest.shards) == 6
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        s["path"].split("/")[1] for s in manifest.shards)


def test_read_shards_checks_they_exist(tmp_path, tokenizer_dir):
    (tmp_path / "corpus.txt").write_text(BLANK_LINE_TEXT, encoding="utf-8")
    run([tmp_path / "corpus.txt"], tmp_path / "out", tokenizer_dir)
    [shard] = read_shards(tmp_path / "out")
    (tmp_path / "out" / "shards" / shard.rsplit("/", 1)[1]).unlink()
    with pytest.raises(BertJaxError, match="shard listed in .*manifest.json is missing"):
        read_shards(tmp_path / "out")
