"""Training a WordPiece tokenizer (BERT's) with `tokenizers`, saved as `transformers` would.

The directory gets `tokenizer.json` (with the [CLS] ... [SEP] post-processor), `vocab.txt`
and `tokenizer_config.json`, so bert_jax, `transformers.AutoTokenizer` and tools that only
read `vocab.txt` all load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing

from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 30522,
                    lowercase: bool = False, min_frequency: int = 2,
                    overwrite: bool = True) -> Path:
    """Train on `texts` (any iterable of strings, e.g. the lines of a corpus) and save."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise BertJaxError(f"vocab_size {vocab_size} leaves no room beside the special tokens")
    tokenizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase or None)
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS.values()))
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise BertJaxError("no text to train the tokenizer on")
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = BertProcessing((sep, tokenizer.token_to_id(sep)),
                                              (cls, tokenizer.token_to_id(cls)))
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        tokenizer.save_model(str(staging))  # vocab.txt
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                  **SPECIAL_TOKENS}
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2),
                                                       encoding="utf-8")
    return Path(out_dir)


def lines_of(paths: list[str]) -> Iterable[str]:
    """The lines of text files (UTF-8; undecodable bytes replaced), for training."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f
        except OSError as err:
            raise BertJaxError(f"{path}: cannot be read ({err.strerror})") from None
