"""File helpers that keep bad input from crashing or leaving half-written output.

Paths a user gives (run directories, prepared data, model directories) may be local or remote
(`gs://bucket/...`, through `etils.epath`, as Orbax and Grain take them). Object stores have
neither directory renames nor appends, and some readers and writers (safetensors, tokenizers,
ArrayRecord's writer, TensorBoard) want local files, so for a remote target:

- `atomic_directory` builds the directory locally and uploads it once complete; only a crash
  during the upload can leave a partial directory (which the next write replaces);
- `local_copy` downloads a remote directory to read it;
- `scratch_dir` + `publish` write files locally, then upload each finished one (an object
  appears whole);
- `SyncedDir` keeps appended logs locally and uploads each changed file whole on `sync()`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from etils import epath

from bert_jax.errors import BertJaxError

_CHUNK_BYTES = 16 * 2**20  # per read/write when copying a file


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL such as gs://bucket/dir rather than a local path."""
    return "://" in os.fspath(path)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, turning I/O and syntax problems into a message naming the file."""
    try:
        data = json.loads(epath.Path(path).read_text(encoding="utf-8"))
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
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a local temporary directory that replaces `target` only if the block succeeds:
    a sibling renamed into place, or for a remote `target` one uploaded (module docstring).

    On any error the temporary directory is removed, so no partial output is left behind.
    """
    target, remote = epath.Path(target), is_remote(target)
    if target.exists() and not overwrite:
        raise BertJaxError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise BertJaxError(f"{target}: exists and is not a directory")
    if not remote:
        target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-",
                                    dir=None if remote else target.parent))
    try:
        yield staging
        if target.exists():
            target.rmtree()
        if remote:
            copy_tree(staging, target)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file; either side may be remote."""
    with epath.Path(src).open("rb") as reader, epath.Path(dst).open("wb") as writer:
        shutil.copyfileobj(reader, writer, _CHUNK_BYTES)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the files under directory `src` into `dst`, subdirectories before a directory's
    own files; either side may be remote."""
    src, dst = epath.Path(src), epath.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    children = list(src.iterdir())
    folders = [child for child in children if child.is_dir()]
    for folder in folders:
        copy_tree(folder, dst / folder.name)
    for child in sorted(set(children) - set(folders)):
        copy_file(child, dst / child.name)


def local_copy(path: str | os.PathLike) -> Path:
    """`path` for readers that need local files: itself when local, else a download of the
    remote directory into a temporary directory removed when the program exits."""
    if not is_remote(path):
        return Path(path)
    source = epath.Path(path)
    if not source.is_dir():
        raise BertJaxError(f"{path}: no such directory")
    scratch = tempfile.mkdtemp(prefix="bert_jax-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    copy_tree(source, Path(scratch) / source.name)
    return Path(scratch) / source.name


@contextlib.contextmanager
def scratch_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write files that `publish` then moves into `target`: `target`
    itself when local (so publishing is a rename), else a temporary one, removed afterwards."""
    if not is_remote(target):
        yield Path(target)
        return
    scratch = tempfile.mkdtemp(prefix="bert_jax-")
    try:
        yield Path(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(local: Path, target: str | os.PathLike) -> None:
    """Move the finished local file `local` to `target`: an atomic rename on the same disk,
    an upload (the object appears whole) to a remote `target`."""
    if is_remote(target):
        copy_file(local, target)
        local.unlink()
    else:
        os.replace(local, target)


class SyncedDir:
    """A local directory for files written by appending (JSONL logs, TensorBoard events):
    `target` itself when local; for a remote `target`, a temporary directory whose changed
    files `sync()` uploads whole. The `resume` files `target` already has are downloaded
    first, so appends go on after a restart."""

    def __init__(self, target: str | os.PathLike, resume: tuple[str, ...] = ()):
        self.target, self.remote = epath.Path(target), is_remote(target)
        self.local = Path(tempfile.mkdtemp(prefix="bert_jax-")) if self.remote else Path(target)
        self._synced: dict[Path, tuple[int, int]] = {}
        for name in resume if self.remote else ():
            if (self.target / name).exists():
                copy_file(self.target / name, self.local / name)

    def sync(self) -> None:
        """Upload the files that changed since the last sync (nothing to do when local)."""
        if not self.remote:
            return
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            stat = path.stat()
            if self._synced.get(path) != (stat.st_size, stat.st_mtime_ns):
                (self.target / path.parent.relative_to(self.local)).mkdir(parents=True,
                                                                          exist_ok=True)
                copy_file(path, self.target / path.relative_to(self.local))
                self._synced[path] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
