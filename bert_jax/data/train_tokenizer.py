"""Training BERT tokenizers, saved as `transformers` would: WordPiece (BERT's, with `tokenizers`)
or SentencePiece unigram / BPE (with `sentencepiece`).

Both kinds put BERT's special tokens at the same ids ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3,
[MASK] 4) and add [CLS] ... [SEP] around a sequence, so the pretraining pipeline takes either.

A WordPiece directory gets `tokenizer.json`, `vocab.txt` (for tools that read only that) and
`tokenizer_config.json`. A SentencePiece directory gets the model itself (`tokenizer.model`, for
sentencepiece-based tools) and a `tokenizer.json` converted from it here, which encodes as the
model does (special tokens written in the text are matched, as in transformers; a unigram tie
such as "000" = 0|00 = 00|0 may split the other way). We convert rather than leave it to
`transformers`: its conversions belong to model classes (ALBERT, T5, DeBERTa-v2, ...) that add
their own normalization, and none reproduces a plain SentencePiece model. The config's
`PreTrainedTokenizerFast` makes `transformers.AutoTokenizer` read `tokenizer.json` as is, as
`load_tokenizer` does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import BPE, Unigram
from tokenizers.processors import BertProcessing

from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 30522,
                    lowercase: bool = False, min_frequency: int = 2,
                    overwrite: bool = True, show_progress: bool = True) -> Path:
    """Train on `texts` (any iterable of strings, e.g. the lines of a corpus) and save."""
    _check_vocab_size(vocab_size)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        tokenizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase or None)
        tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS.values()),
                                      show_progress=show_progress)
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise BertJaxError("no text to train the tokenizer on")
        _add_cls_sep(tokenizer)
        tokenizer.save(str(staging / "tokenizer.json"))
        tokenizer.save_model(str(staging))  # vocab.txt
        _save_config(staging, tokenizer_class="BertTokenizer", do_lower_case=lowercase)
    return Path(out_dir)


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *,
                        model_type: str = "unigram", vocab_size: int = 30522,
                        lowercase: bool = False, character_coverage: float = 0.9995,
                        input_sentence_size: int = 0, overwrite: bool = True) -> Path:
    """Train a SentencePiece `model_type` ("unigram" or "bpe") model on `texts` and save it.

    `lowercase` case-folds in the model's own normalizer (SentencePiece's nmt_nfkc_cf rule,
    accents kept), so every loader of the model lowercases alike. The vocabulary spells
    `character_coverage` of the text's characters; the rarest others become [UNK] (1.0 keeps
    them all). SentencePiece holds its input in memory, so `input_sentence_size` > 0 trains on a
    random sample of that many lines; it skips lines over 4192 bytes (one sentence or paragraph
    per line suits it).
    """
    if model_type not in ("unigram", "bpe"):
        raise BertJaxError(f"unknown SentencePiece model type {model_type!r} (unigram or bpe)")
    _check_vocab_size(vocab_size)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model = _train_sentencepiece(
            texts, model_type=model_type, vocab_size=vocab_size,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, pad_id=0, pad_piece=SPECIAL_TOKENS["pad_token"],
            unk_id=1, unk_piece=SPECIAL_TOKENS["unk_token"], bos_id=-1, eos_id=-1,
            control_symbols=[SPECIAL_TOKENS[k] for k in ("cls_token", "sep_token", "mask_token")],
            minloglevel=2)  # its warnings go to stderr unasked; errors come back as exceptions
        (staging / "tokenizer.model").write_bytes(model)
        _sentencepiece_as_tokenizers(model).save(str(staging / "tokenizer.json"))
        _save_config(staging, tokenizer_class="PreTrainedTokenizerFast")
    return Path(out_dir)


def lines_of(paths: list[str]) -> Iterable[str]:
    """The lines of text files (UTF-8; undecodable bytes replaced), for training."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f
        except OSError as err:
            raise BertJaxError(f"{path}: cannot be read ({err.strerror})") from None


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size <= len(SPECIAL_TOKENS):
        raise BertJaxError(f"vocab_size {vocab_size} leaves no room beside the special tokens")


def _train_sentencepiece(texts: Iterable[str], **options) -> bytes:
    """The serialized model. SentencePiece reports every problem, an exception raised by `texts`
    (e.g. an unreadable file) included, as a RuntimeError; those become clear errors here."""
    failure, count = None, 0

    def sentences():
        nonlocal failure, count
        try:
            for text in texts:
                if text := text.strip():
                    count += 1
                    yield text
        except Exception as err:
            failure = err
            raise

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences(),
                                                 model_writer=model, **options)
    except RuntimeError as err:
        if failure is not None:
            raise failure from None
        if "sentences_.empty()" in str(err):  # nothing left after skipping too long lines
            raise BertJaxError("no text to train the tokenizer on" + (
                " (SentencePiece skips lines over 4192 bytes)" if count else "")) from None
        # "INTERNAL: src/trainer_interface.cc(638) [check] Vocabulary size is smaller ..."
        reason = str(err).rpartition("] ")[2].strip() or str(err)
        raise BertJaxError(f"SentencePiece training failed: {reason}") from None
    return model.getvalue()


def _sentencepiece_as_tokenizers(model: bytes) -> tokenizers.Tokenizer:
    """A `tokenizers` pipeline that encodes as the SentencePiece `model` trained above does:
    its precompiled normalization, extra whitespace removed, "▁" before every word, the same
    unigram pieces and scores or BPE merges, and the special tokens matched in the text."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        backend = tokenizers.Tokenizer(Unigram(
            pieces, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    else:
        # SentencePiece BPE merges, best score first, any two pieces that make a learned piece.
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        learned = sorted((p for p in proto.pieces if p.type == p.NORMAL), key=lambda p: -p.score)
        merges = [(p.piece[:k], p.piece[k:]) for p in learned for k in range(1, len(p.piece))
                  if p.piece[:k] in vocab and p.piece[k:] in vocab]
        backend = tokenizers.Tokenizer(BPE(
            vocab, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    _add_cls_sep(backend)
    return backend


def _add_cls_sep(tokenizer) -> None:
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = BertProcessing((sep, tokenizer.token_to_id(sep)),
                                              (cls, tokenizer.token_to_id(cls)))


def _save_config(directory: Path, **config) -> None:
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, **SPECIAL_TOKENS}, indent=2), encoding="utf-8")
