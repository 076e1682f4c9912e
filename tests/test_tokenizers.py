"""SentencePiece tokenizers: trained unigram and BPE directories encode as the SentencePiece
model itself, transformers.AutoTokenizer and load_tokenizer all do (prepare-data too), with
BERT's special tokens at the WordPiece trainer's ids; SentencePiece-only directories (ALBERT,
XLM-R, T5 style) load as AutoTokenizer loads them; bad input fails with one clear line and
leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece
from array_record.python.array_record_module import ArrayRecordReader
from conftest import docstrings, transformers

from bert_jax.cli import main
from bert_jax.data.prepare import prepare_corpus, read_shards
from bert_jax.data.records import decode_document
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.data.train_tokenizer import train_sentencepiece, train_wordpiece
from bert_jax.errors import BertJaxError

NORDIC = ["Blåbærsyltetøy og rømmegrøt står på bordet i Bergen.",
          "Smörgåsbordet i Göteborg är större än väntat.",
          "Ærø og Møn er øer i Østersøen, nær Malmö.",
          "Vi åt räkor och drack öl på färjan till Åland.",
          "Älvdalen och Åre ligger i Sverige, Ørsta og Ålesund i Norge.",
          "Ærøskøbing ligger i Danmark."] * 20
HELD_OUT_NORDIC = ["Jeg spiser brød med brunost på søndag.", "Älgen står still på ängen.",
                   "Kjære dagbok: I dag så jeg en ørn over fjorden ved Ålesund."]
# SentencePiece's normalization: extra whitespace removed, NFKC (ligature, full width, circled).
MESSY = ["  two  spaces,\ta tab and a newline\n", "ﬁne ＡＢＣ ① ", "combining a\u030a vs å"]
SPECIAL = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


@pytest.fixture(scope="module")
def corpus():
    """(training lines, held-out lines): standard-library docstrings with some Nordic text."""
    docs = docstrings(600)
    train = [line for doc in docs[:520] for line in doc.splitlines()] + NORDIC
    held_out = [line for doc in docs[520:] for line in doc.splitlines()][:300] + HELD_OUT_NORDIC
    return train, held_out


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A cased unigram and a cased BPE tokenizer directory."""
    root = tmp_path_factory.mktemp("sentencepiece")
    return {kind: train_sentencepiece(corpus[0], root / kind, model_type=kind, vocab_size=600,
                                      character_coverage=1.0)  # keeps the rare Ä Ø Æ
            for kind in ("unigram", "bpe")}


def spm(directory) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def assert_same_ids(directory, texts, *, model=None):
    """load_tokenizer encodes as AutoTokenizer does and, given `model`, as that SentencePiece
    model does with [CLS] ... [SEP] around."""
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for text in texts:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        if model is not None:
            assert expected == [theirs.cls_token_id, *model.encode(text), theirs.sep_token_id]
    assert (ours.mask_token_id, ours.pad_token_id) == (theirs.mask_token_id, theirs.pad_token_id)
    return ours, theirs


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_trained_tokenizer_encodes_as_sentencepiece(trained, corpus, kind):
    model = spm(trained[kind])
    ours, theirs = assert_same_ids(trained[kind], corpus[1] + MESSY, model=model)
    for text in HELD_OUT_NORDIC:  # å æ ø ä ö are pieces of their own, not [UNK]
        assert model.unk_id() not in model.encode(text)
        ids = ours.encode(text)
        assert (ours.decode(ids, skip_special_tokens=True)
                == theirs.decode(ids, skip_special_tokens=True) == model.decode(model.encode(text)))


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_special_tokens_at_the_wordpiece_ids(trained, corpus, kind, tmp_path):
    wordpiece = transformers.AutoTokenizer.from_pretrained(
        train_wordpiece(corpus[0][:500], tmp_path / "wordpiece", vocab_size=300))
    theirs = transformers.AutoTokenizer.from_pretrained(trained[kind])
    ids = [getattr(theirs, f"{name}_id") for name in SPECIAL]
    assert ids == [getattr(wordpiece, f"{name}_id") for name in SPECIAL]
    assert ids == [spm(trained[kind]).piece_to_id(getattr(theirs, name)) for name in SPECIAL]
    # What the pretraining pipeline looks up, and a mask written in the text (fill-mask).
    ours = load_tokenizer(trained[kind])
    assert [ours.backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")] == [
        theirs.cls_token_id, theirs.sep_token_id, theirs.pad_token_id]
    text = "Return the [MASK] of the list."
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.encode(text).count(ours.mask_token_id) == 1


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_prepared_shards_hold_the_sentencepiece_ids(trained, corpus, kind, tmp_path):
    """prepare-data, the pretraining input, takes the directory as it takes a WordPiece one."""
    sentences = corpus[1][:60]
    (tmp_path / "corpus.txt").write_text("\n".join(sentences), encoding="utf-8")
    prepare_corpus([str(tmp_path / "corpus.txt")], tmp_path / "shards", trained[kind],
                   doc_mode="line", workers=1, progress=False)
    documents = []
    for path in read_shards(tmp_path / "shards"):
        reader = ArrayRecordReader(path)
        documents += [[s.tolist() for s in decode_document(r)] for r in reader.read_all()]
        reader.close()
    model = spm(trained[kind])
    assert documents == [[model.encode(s)] for s in sentences]


def test_lowercase(trained, corpus, tmp_path):
    lower = train_sentencepiece(corpus[0][-2000:], tmp_path / "lower", vocab_size=400,
                                lowercase=True)
    model = spm(lower)
    ours, _ = assert_same_ids(lower, corpus[1][:50] + HELD_OUT_NORDIC, model=model)
    cased = load_tokenizer(trained["unigram"])
    for text in ("Return The VALUE.", "ÆRØ OG MØN"):
        assert ours.encode(text) == ours.encode(text.lower())
        assert cased.encode(text) != cased.encode(text.lower())


SENTENCEPIECE_ONLY = {  # tokenizer class -> (model file name, tokenizer_config.json)
    "ours": ("tokenizer.model", None),  # a trained directory without its tokenizer.json
    "albert": ("spiece.model", {"tokenizer_class": "AlbertTokenizer", "do_lower_case": False,
                                "keep_accents": True, "unk_token": "[UNK]", "pad_token": "[PAD]"}),
    "xlm-r": ("sentencepiece.bpe.model", {"tokenizer_class": "XLMRobertaTokenizer"}),
    "t5": ("spiece.model", {"tokenizer_class": "T5Tokenizer"}),
}


@pytest.mark.parametrize("kind, style", [("unigram", s) for s in SENTENCEPIECE_ONLY]
                         + [("bpe", "ours")])
def test_sentencepiece_only_directory_loads_as_transformers(trained, corpus, tmp_path, kind,
                                                            style):
    name, config = SENTENCEPIECE_ONLY[style]
    shutil.copy(trained[kind] / "tokenizer.model", tmp_path / name)
    if config is None:
        shutil.copy(trained[kind] / "tokenizer_config.json", tmp_path)
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "tokenizer_config.json"])
    assert_same_ids(tmp_path, corpus[1][:100] + HELD_OUT_NORDIC)


def test_sentencepiece_only_directory_errors(trained, tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x03not a model" * 10)
    with pytest.raises(BertJaxError, match="needs a tokenizer_config.json naming its tokenizer_"):
        load_tokenizer(tmp_path)  # AutoTokenizer would not know which class to use either
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class":
                                                                "AlbertTokenizer"}))
    with pytest.raises(BertJaxError, match="spiece.model: not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
    # transformers' ALBERT class only reads spiece.model, and would build a 5-token vocabulary.
    (tmp_path / "spiece.model").unlink()
    shutil.copy(trained["unigram"] / "tokenizer.model", tmp_path / "albert.model")
    with pytest.raises(BertJaxError, match="AlbertTokenizer reads spiece.model, not albert.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_cli(corpus, tmp_path, kind, capsys):
    (tmp_path / "corpus.txt").write_text("\n".join(corpus[0][-2000:]), encoding="utf-8")
    assert main(["train-tokenizer", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tok"),
                 "--type", kind, "--vocab-size", "400"]) == 0
    assert f"SentencePiece {kind} tokenizer" in capsys.readouterr().out
    assert spm(tmp_path / "tok").get_piece_size() == 400
    assert_same_ids(tmp_path / "tok", corpus[1][:50] + HELD_OUT_NORDIC, model=spm(tmp_path / "tok"))


@pytest.mark.parametrize("lines, options, message", [
    ([], ["--type", "unigram"], "no text to train the tokenizer on"),
    (["", "  ", "\t"], ["--type", "bpe"], "no text to train the tokenizer on"),
    (["word " * 1000] * 3, ["--type", "bpe"], "skips lines over 4192 bytes"),
    (NORDIC, ["--type", "unigram", "--vocab-size", "5"], "leaves no room beside the special"),
    (NORDIC, ["--type", "unigram", "--vocab-size", "30"], "Vocabulary size is smaller than"),
    (NORDIC, ["--type", "bpe", "--vocab-size", "100000"], "Vocabulary size too high (100000)"),
    (None, ["--type", "unigram"], "corpus.txt: cannot be read"),  # no such file
])
def test_bad_input(tmp_path, capfd, lines, options, message):
    if lines is not None:
        (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    assert main(["train-tokenizer", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "tok"),
                 *options]) == 1
    err = capfd.readouterr().err.splitlines()  # file descriptor 2: SentencePiece's C++ logs too
    assert len(err) == 1 and err[0].startswith("bert-jax: error: ") and message in err[0], err
    # No output and no staging directory left behind.
    assert [p.name for p in tmp_path.iterdir()] == ([] if lines is None else ["corpus.txt"])


def test_unknown_model_type(tmp_path):
    with pytest.raises(BertJaxError, match="unknown SentencePiece model type 'char'"):
        train_sentencepiece(["some text"], tmp_path / "tok", model_type="char", vocab_size=50)
    assert not list(tmp_path.iterdir())
