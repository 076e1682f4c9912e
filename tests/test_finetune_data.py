"""Fine-tuning data against `transformers`: the same token ids for texts, pairs (truncated
longest first) and pre-split words, labels aligned as its run_ner example aligns them; tag
scheme conversions that keep seqeval's entities; length buckets; tfds sources (mocked);
and a clear message for each kind of bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import transformers
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2, IOBES, Entities

from bert_jax.data.batching import Features, batches, bucket_lengths
from bert_jax.data.classification import ClassificationData, load_classification
from bert_jax.data.tagging import convert_tags
from bert_jax.data.token_classification import TokenClassificationData, load_token_classification
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError

WORDS = "the a cat dog sat ran on in mat oslo paris bergen big small".split()
PIECES = ["##s", "##ed", "##ing", "##en", "##a"]
TYPES = ["PER", "LOC", "ORG"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A WordPiece tokenizer saved by transformers from a tiny vocabulary."""
    path = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS + PIECES
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    (path / "vocab.txt").unlink()
    return path


def random_words(rng, n):
    """Known words, words split into sub-tokens, and unknown words ([UNK])."""
    return [rng.choice(WORDS) + "".join(rng.choice([p[2:] for p in PIECES],
                                                   rng.integers(0, 3)))
            if rng.random() < 0.9 else "xyz" for _ in range(n)]


def random_iob2(rng, n):
    tags, inside = [], None
    for _ in range(n):
        kind = rng.choice(["O", "B", "I"] if inside else ["O", "B"])
        inside = rng.choice(TYPES) if kind == "B" else inside if kind == "I" else None
        tags.append("O" if kind == "O" else f"{kind}-{inside}")
    return tags


def test_pairs_truncate_as_transformers(tok_dir, tmp_path):
    rng = np.random.default_rng(0)
    rows = [(" ".join(random_words(rng, rng.integers(1, 12))),
             " ".join(random_words(rng, rng.integers(1, 12))), rng.choice(["pos", "neg", "mid"]))
            for _ in range(40)]
    with (tmp_path / "train.tsv").open("w") as f:
        f.write("first\tsecond\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    for pair_column in ("second", None):
        data = load_classification(ClassificationData(
            train=str(tmp_path / "train.tsv"), text_column="first", text_pair_column=pair_column,
            max_seq_length=12), load_tokenizer(tok_dir))
        expected = hf([a for a, _, _ in rows], [b for _, b, _ in rows] if pair_column else None,
                      truncation=True, max_length=12)
        assert [ids.tolist() for ids in data.train.input_ids] == expected["input_ids"]
        assert [t.tolist() for t in data.train.token_type_ids] == expected["token_type_ids"]
        # run_glue's label list for string labels: the training split's, sorted
        assert data.labels == tuple(sorted({y for _, _, y in rows}))
        assert data.train.labels.tolist() == [data.labels.index(y) for _, _, y in rows]
        assert data.problem_type == "single_label_classification"


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_ner_labels_align_as_transformers(tok_dir, tmp_path, label_all_tokens):
    rng = np.random.default_rng(1)
    sentences = [(random_words(rng, n), random_iob2(rng, n)) for n in rng.integers(1, 14, 30)]
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags)] + [""]
    (tmp_path / "train.conll").write_text("\n".join(lines) + "\n")
    data = load_token_classification(TokenClassificationData(
        train=str(tmp_path / "train.conll"), max_seq_length=16,
        label_all_tokens=label_all_tokens), load_tokenizer(tok_dir))

    # transformers' examples/pytorch/token-classification/run_ner.py
    label_list = sorted({t for _, tags in sentences for t in tags})
    label_to_id = {label: i for i, label in enumerate(label_list)}
    b_to_i_label = [label_list.index(label.replace("B-", "I-"))
                    if label.startswith("B-") and label.replace("B-", "I-") in label_list else i
                    for i, label in enumerate(label_list)]
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    inputs = hf([words for words, _ in sentences], is_split_into_words=True, truncation=True,
                max_length=16)
    labels = []
    for i, (_, tags) in enumerate(sentences):
        previous_word_idx, label_ids = None, []
        for word_idx in inputs.word_ids(batch_index=i):
            if word_idx is None:
                label_ids.append(-100)
            elif word_idx != previous_word_idx:
                label_ids.append(label_to_id[tags[word_idx]])
            else:
                label_ids.append(b_to_i_label[label_to_id[tags[word_idx]]]
                                 if label_all_tokens else -100)
            previous_word_idx = word_idx
        labels.append(label_ids)

    assert data.labels == tuple(label_list)
    assert [ids.tolist() for ids in data.train.input_ids] == inputs["input_ids"]
    assert [row.tolist() for row in data.train.labels] == labels
    assert any(len(ids) == 16 for ids in inputs["input_ids"])  # some were truncated


def test_ner_tags_take_the_label_maps_scheme(tok_dir, tmp_path):
    """An IOB1 file read for a model whose label map is BIOES: first sub-tokens carry BIOES
    tags holding the entities conlleval reads in the file."""
    rng = np.random.default_rng(6)
    sentences = [[str(rng.choice(["O", "I-PER", "I-LOC", "B-PER", "B-LOC"])) for _ in range(n)]
                 for n in rng.integers(1, 10, 20)]
    (tmp_path / "iob1.conll").write_text("\n\n".join(
        "\n".join(f"{rng.choice(WORDS)}s {tag}" for tag in tags) for tags in sentences))
    labels = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BIES"]
    data = load_token_classification(TokenClassificationData(
        train=str(tmp_path / "iob1.conll"), tag_scheme="IOB1", labels=labels),
        load_tokenizer(tok_dir))
    for tags, row in zip(sentences, data.train.labels, strict=True):
        bioes = [labels[i] for i in row if i != -100]
        strict = Entities([bioes], IOBES).entities[0]
        assert [(e.tag, e.start, e.end - 1) for e in strict] == get_entities(tags)


def test_tag_schemes_keep_seqevals_entities():
    """Any tag sequence, read as conlleval (seqeval's default mode) reads it, converted to IOB2
    and BIOES: the same entities, well formed in the target scheme (seqeval's strict mode)."""
    rng = np.random.default_rng(2)
    for source, prefixes in (("IOB1", "BI"), ("IOB2", "BI"), ("BIOES", "BIES")):
        for _ in range(100):
            tags = [str(rng.choice(["O"] + [f"{p}-{t}" for p in prefixes for t in TYPES[:2]]))
                    for _ in range(rng.integers(1, 12))]
            iob2 = convert_tags(tags, source, "IOB2")
            bioes = convert_tags(tags, source, "BIOES")
            for converted, scheme in ((iob2, IOB2), (bioes, IOBES)):
                strict = Entities([converted], scheme).entities[0]
                assert [(e.tag, e.start, e.end - 1) for e in strict] == get_entities(tags)
            assert convert_tags(bioes, "BIOES", "IOB2") == iob2


def test_buckets_and_padding():
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert bucket_lengths(100, 8) == (8, 16, 32, 64, 100)
    assert bucket_lengths(512, midpoints=True) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert bucket_lengths(100, 8, midpoints=True) == (8, 12, 16, 24, 32, 48, 64, 96, 100)
    assert bucket_lengths(8, 1, midpoints=True) == (1, 2, 3, 4, 6, 8)
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 100, 23)
    features = Features([rng.integers(5, 50, n).astype(np.int32) for n in lengths],
                        [np.zeros(n, np.int32) for n in lengths],
                        rng.integers(0, 3, len(lengths)).astype(np.int32))
    buckets = bucket_lengths(100, 8)
    seen = []
    for batch in batches(features, batch_size=8, buckets=buckets, pad_id=0):
        real = batch["example_id"] >= 0
        longest = max(lengths[batch["example_id"][real]])
        width = batch["input_ids"].shape[1]
        assert batch["input_ids"].shape == (8, width)
        assert width == min(b for b in buckets if b >= longest)
        for row, index in enumerate(batch["example_id"]):
            n = lengths[index] if index >= 0 else 0
            assert batch["input_ids"][row, :n].tolist() == features.input_ids[index][:n].tolist()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert batch["labels"][row] == (features.labels[index] if index >= 0 else -100)
        seen += batch["example_id"][real].tolist()
    assert seen == list(range(23))  # every example once, in order, last batch padded (23 = 2*8+7)

    # a training stream: shuffled, reshuffled each epoch, partial batches dropped
    epochs = [batch["example_id"] for batch in batches(
        features, batch_size=8, buckets=buckets, pad_id=0, seed=1, num_epochs=2,
        drop_remainder=True)]
    assert len(epochs) == 5 and all((ids >= 0).all() for ids in epochs)
    assert np.concatenate(epochs)[:8].tolist() != list(range(8))

    # two processes keep halves of the same global batches, padded to the same bucket
    whole = list(batches(features, batch_size=8, buckets=buckets, pad_id=0, seed=1))
    for index in range(2):
        half = list(batches(features, batch_size=8, buckets=buckets, pad_id=0, seed=1,
                            process_index=index, process_count=2))
        for full, part in zip(whole, half, strict=True):
            for key in full:
                np.testing.assert_array_equal(part[key], full[key][index * 4:(index + 1) * 4])


def test_multi_label_and_regression(tok_dir, tmp_path):
    sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")
    rng = np.random.default_rng(4)
    names = ["sport", "news", "art", "food"]
    rows = [{"text": " ".join(random_words(rng, 5)),
             "tags": [str(t) for t in rng.choice(names, rng.integers(0, 3), replace=False)],
             "score": float(rng.random() * 5)} for _ in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tok_dir)
    data = load_classification(ClassificationData(train=str(tmp_path / "train.jsonl"),
                                                  text_column="text", label_column="tags"),
                               tokenizer)
    binarizer = sklearn_preprocessing.MultiLabelBinarizer().fit([r["tags"] for r in rows])
    assert data.problem_type == "multi_label_classification"
    assert data.labels == tuple(binarizer.classes_)
    np.testing.assert_array_equal(data.train.labels, binarizer.transform([r["tags"] for r in rows]))

    columns = "".join(f"{r['text']},{','.join(str(int(n in r['tags'])) for n in names)}\n"
                      for r in rows)
    (tmp_path / "train.csv").write_text("text," + ",".join(names) + "\n" + columns)
    data = load_classification(ClassificationData(train=str(tmp_path / "train.csv"),
                                                  text_column="text", label_column=names),
                               tokenizer)
    assert data.labels == tuple(names)
    np.testing.assert_array_equal(data.train.labels, sklearn_preprocessing.MultiLabelBinarizer(
        classes=names).fit_transform([r["tags"] for r in rows]))

    data = load_classification(ClassificationData(train=str(tmp_path / "train.jsonl"),
                                                  text_column="text", label_column="score"),
                               tokenizer)
    assert data.problem_type == "regression" and data.labels == ("LABEL_0",)
    np.testing.assert_array_equal(data.train.labels, np.float32([r["score"] for r in rows]))


def test_tfds_sources(tok_dir, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets",
                               reason="tensorflow-datasets is not installed (optional)")
    tokenizer = load_tokenizer(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    with tfds.testing.mock_data(num_examples=6):
        data = load_classification(ClassificationData(train="train", eval="validation_matched",
                                                      tfds="glue/mnli"), tokenizer)
        source = tfds.data_source("glue/mnli", split="validation_matched")
        rows = [source[i] for i in range(len(source))]
        stsb = load_classification(ClassificationData(train="train", tfds="glue/stsb"), tokenizer)
        stsb_source = tfds.data_source("glue/stsb", split="train")
    assert data.labels == ("entailment", "neutral", "contradiction")  # the dataset's ids
    expected = hf([str(r["premise"]) for r in rows], [str(r["hypothesis"]) for r in rows],
                  truncation=True, max_length=128)
    assert [ids.tolist() for ids in data.eval.input_ids] == expected["input_ids"]
    assert data.eval.labels.tolist() == [int(r["label"]) for r in rows]
    assert stsb.problem_type == "regression"
    np.testing.assert_array_equal(stsb.train.labels, [stsb_source[i]["label"] for i in range(6)])

    # CoNLL-2003: the same sentences from tfds (class ids) and from a CoNLL file agree
    names = tfds.builder("conll2003").info.features["ner"].feature.names
    rng = np.random.default_rng(5)
    sentences = [(random_words(rng, n), random_iob2(rng, n)) for n in (3, 7, 5)]
    sentences = [(w, [t if t in names else "O" for t in tags]) for w, tags in sentences]
    examples = [{"tokens": np.array(w), "ner": np.array([names.index(t) for t in tags]),
                 "pos": np.zeros(len(w), np.int64), "chunks": np.zeros(len(w), np.int64)}
                for w, tags in sentences]
    with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
        from_tfds = load_token_classification(
            TokenClassificationData(train="train", tfds="conll2003"), tokenizer)
    (tmp_path / "train.conll").write_text("\n\n".join(
        "\n".join(f"{w} {t}" for w, t in zip(*sentence)) for sentence in sentences))
    from_file = load_token_classification(
        TokenClassificationData(train=str(tmp_path / "train.conll"), labels=names), tokenizer)
    assert from_tfds.labels == tuple(names)
    for a, b in zip(from_tfds.train.labels + from_tfds.train.input_ids,
                    from_file.train.labels + from_file.train.input_ids, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_messages(tok_dir, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(tok_dir)

    def fails(match, config, load=load_classification):
        with pytest.raises(BertJaxError, match=match):
            load(config, tokenizer)

    train, eval_ = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("text,label\nthe cat,pos\nthe dog,neg\n")
    eval_.write_text("text,label\nthe cat,pos\nthe mat,maybe\n")
    fails(r"eval.csv:3: label 'maybe' is not in the label map \(neg, pos\)",
          ClassificationData(train=str(train), eval=str(eval_), text_column="text"))
    fails(r"train.csv:3: label 'neg' is not in the label map \(pos, mid\)",
          ClassificationData(train=str(train), text_column="text", labels=["pos", "mid"]))
    fails(r"train.csv:2: no column 'sentence' \(columns: text, label\)",
          ClassificationData(train=str(train), text_column="sentence"))
    fails(r"train.csv:2: label 'pos' is not a number",
          ClassificationData(train=str(train), text_column="text", problem_type="regression"))
    (tmp_path / "empty.csv").write_text("")
    fails(r"empty.csv: no examples \(empty file\)",
          ClassificationData(train=str(tmp_path / "empty.csv"), text_column="text"))

    ner = TokenClassificationData
    conll = tmp_path / "train.conll"
    conll.write_text("-DOCSTART- O\n\nthe O\ncat B-PER\n\noslo B-LOC\nparis big I-LOC\n")
    fails(r"train.conll:7: malformed line: 3 columns where the file has 2",
          ner(train=str(conll)), load_token_classification)
    conll.write_text("the O\ncat B-PER\n\noslo B-LOC\n")
    (tmp_path / "eval.conll").write_text("the O\n\ncat O\nbig B-ORG\n")
    fails(r"eval.conll:4: label 'B-ORG' is not in the label map",
          ner(train=str(conll), eval=str(tmp_path / "eval.conll")), load_token_classification)
    (tmp_path / "eval.conll").write_text("the O\ncat X-PER\n")
    fails(r"eval.conll:2: tag 'X-PER' is not an IOB2 tag",
          ner(train=str(conll), eval=str(tmp_path / "eval.conll")), load_token_classification)
    (tmp_path / "empty.conll").write_text("-DOCSTART- O\n\n")
    fails(r"empty.conll: no sentences \(empty file\)", ner(train=str(tmp_path / "empty.conll")),
          load_token_classification)
    (tmp_path / "train.jsonl").write_text(json.dumps({"tokens": ["a", "cat"], "ner": ["O"]}))
    fails(r"train.jsonl:1: 2 tokens but 1 tags", ner(train=str(tmp_path / "train.jsonl")),
          load_token_classification)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
    fails(r"reading tensorflow-datasets sources needs `pip install tensorflow-datasets`",
          ClassificationData(train="train", tfds="glue/sst2"))
