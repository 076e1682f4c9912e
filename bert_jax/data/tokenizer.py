"""Tokenizers from a model directory, through the `tokenizers` library.

`tokenizer.json` (what `transformers` fast tokenizers save) is used as is; a directory with
only a WordPiece `vocab.txt` (older BERT checkpoints) gets the standard BERT pipeline, with
the casing from `tokenizer_config.json`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
            backend = BertWordPieceTokenizer(str(model_dir / "vocab.txt"),
                                             lowercase=config.get("do_lower_case", False))._tokenizer
        except (TypeError, ValueError, OSError) as err:  # e.g. [CLS]/[SEP] not in the vocab
            raise BertJaxError(f"{model_dir / 'vocab.txt'}: not a usable WordPiece vocabulary "
                               f"({err})") from None
    else:
        raise BertJaxError(f"{model_dir}: no tokenizer found (expected tokenizer.json or vocab.txt)")
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

