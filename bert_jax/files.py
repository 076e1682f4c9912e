"""File helpers that keep bad input from crashing or leaving half-written output."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from bert_jax.errors import BertJaxError


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object, turning I/O and syntax problems into a message naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BertJaxError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BertJaxError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BertJaxError(f"{path}: expected a JSON object")
    return data


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy whichever tokenizer files `src` has, so a converted model stays usable."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds.

    On any error the temporary directory is removed, so no partial output is left behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise BertJaxError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise BertJaxError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
