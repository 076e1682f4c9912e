"""Tokenizers from a model directory, through the `tokenizers` library.

`tokenizer.json` (what `transformers` fast tokenizers save) is used as is; a directory with
only a WordPiece `vocab.txt` (older BERT checkpoints) gets the standard BERT pipeline, with
the casing from `tokenizer_config.json`. A directory with only a SentencePiece `*.model`
(older ALBERT, XLM-R, T5 checkpoints) is converted in memory by `transformers` (then needed at
run time): each tokenizer class adds its own normalization, id offsets and special tokens to
the model, which only `transformers` knows, so its conversion gives the ids the checkpoint was
trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from bert_jax.errors import BertJaxError
from bert_jax.files import read_json

# transformers' `clean_up_tokenization`, for directories that ask for it.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


@dataclasses.dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    mask_token: str | None
    pad_token_id: int
    clean_up_tokenization_spaces: bool = False

    @property
    def mask_token_id(self) -> int | None:
        return None if self.mask_token is None else self.backend.token_to_id(self.mask_token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    model_dir = Path(model_dir)
    config = _special_tokens(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise BertJaxError(f"{model_dir / 'tokenizer.json'}: cannot be read ({err})") from None
    elif (model_dir / "vocab.txt").is_file():
        try:
            lowercase = config.get("do_lower_case", False)
            backend = BertWordPieceTokenizer(str(model_dir / "vocab.txt"),
                                             lowercase=lowercase)._tokenizer
        except (TypeError, ValueError, OSError) as err:  # e.g. [CLS]/[SEP] not in the vocab
            raise BertJaxError(f"{model_dir / 'vocab.txt'}: not a usable WordPiece vocabulary "
                               f"({err})") from None
    elif model_files := sorted(model_dir.glob("*.model")):
        return _from_sentencepiece(model_dir, model_files, config)
    else:
        raise BertJaxError(f"{model_dir}: no tokenizer found (expected tokenizer.json, vocab.txt "
                           "or a SentencePiece *.model)")
    mask = config.get("mask_token") or next(
        (t for t in ("[MASK]", "<mask>") if backend.token_to_id(t) is not None), None)
    pad = config.get("pad_token")
    pad_id = backend.token_to_id(pad) if pad else None
    return Tokenizer(backend, mask, 0 if pad_id is None else pad_id,
                     bool(config.get("clean_up_tokenization_spaces", False)))


def _special_tokens(model_dir: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json, token dicts flattened."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            config = {**read_json(model_dir / name), **config}
    return {k: v["content"] if isinstance(v, dict) and "content" in v else v
            for k, v in config.items()}


def _from_sentencepiece(model_dir: Path, model_files: list[Path], config: dict) -> Tokenizer:
    """What `transformers.AutoTokenizer` makes of the directory (remote code off)."""
    if "tokenizer_class" not in config and not (model_dir / "config.json").is_file():
        raise BertJaxError(f"{model_dir}: a SentencePiece model needs a tokenizer_config.json "
                           "naming its tokenizer_class (e.g. AlbertTokenizer) or a config.json")
    for path in model_files:
        try:
            sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):
            raise BertJaxError(f"{path}: not a readable SentencePiece model") from None
    try:
        import transformers
    except ImportError:
        raise BertJaxError(f"{model_dir}: converting a SentencePiece model needs transformers "
                           "(pip install transformers)") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as err:  # transformers raises assorted types for directories it cannot use
        reason = " ".join(str(err).split())
        raise BertJaxError(f"{model_dir}: transformers cannot make a tokenizer of it "
                           f"({reason})") from None
    # A class that finds no model file of its name builds a near-empty vocabulary instead.
    if Path(getattr(tokenizer, "vocab_file", None) or "").name not in {p.name for p in model_files}:
        expected = tokenizer.vocab_files_names.get("vocab_file", "its own model file")
        raise BertJaxError(f"{model_dir}: {type(tokenizer).__name__} reads {expected}, not "
                           f"{', '.join(p.name for p in model_files)}")
    return Tokenizer(tokenizer.backend_tokenizer, tokenizer.mask_token,
                     tokenizer.pad_token_id or 0, bool(tokenizer.clean_up_tokenization_spaces))
