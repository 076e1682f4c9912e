"""`bert-jax convert`: a model directory (Hugging Face or Orbax) to either format.

The output goes to a staging directory, is verified there when asked, and only then replaces
DST: a failed conversion or verification leaves DST as it was. With `progress`, tqdm bars on
stderr count the tensors read from an HF directory and the shards written to one; tqdm shows
them only on a terminal, and only once a step has taken a second (Orbax reads and writes are
single calls, without a bar).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from bert_jax.convert import hf_dir, orbax_dir
from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, local_copy
from bert_jax.modeling.scan import unscanned
from bert_jax.pretrained import abstract_params
from bert_jax.tools.verify import Verification, verify

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Conversion:
    config: Any  # the config written to DST
    source_format: str
    target_format: str
    verification: Verification | None


def model_format(path: Path) -> str:
    """"hf" or "orbax" for a model directory; a one-line error for anything else."""
    if not path.is_dir():
        raise BertJaxError(f"{path}: no such directory")
    if hf_dir.is_hf_dir(path):
        return "hf"
    if orbax_dir.is_orbax_dir(path):
        return "orbax"
    raise BertJaxError(f"{path}: not a model directory (expected config.json with "
                       f"model.safetensors or pytorch_model.bin, or with an Orbax params/ dir)")


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            max_shard_size: int | None = None, overwrite: bool = False, verify_output: bool = False,
            tolerance: float | None = None, progress: bool = False) -> Conversion:
    """Convert SRC into DST (HF -> Orbax and Orbax -> HF unless `to` says otherwise).

    dtype: "fp32" or "bf16" for the written weights (and config.json's `dtype`); by default
        HF output keeps the dtype the source declares, Orbax output holds fp32 params.
    max_shard_size: HF output in shards of at most this many bytes, with an index.
    verify_output: compare outputs of SRC and the conversion (see `bert_jax.tools.verify`);
        DST is not written if they differ by more than `tolerance`.
    """
    src = local_copy(src)  # a gs:// SRC is downloaded; a gs:// DST is uploaded once complete
    source_format = model_format(src)
    target_format = to or ("orbax" if source_format == "hf" else "hf")
    if max_shard_size is not None and target_format != "hf":
        raise BertJaxError("--max-shard-size applies to Hugging Face output only (not Orbax)")
    with atomic_directory(dst, overwrite=overwrite) as staging:
        config, params = _read(src, source_format, progress)
        if dtype is not None:
            config = hf_dir.with_declared_dtype(config, DTYPES[dtype])
        # The save functions replace `staging` atomically themselves.
        if target_format == "hf":
            hf_dir.save_hf_dir(config, params, staging, tokenizer_dir=src,
                               max_shard_bytes=max_shard_size, progress=progress)
        else:
            orbax_dir.save_params(config, _cast(params, dtype), staging, tokenizer_dir=src)
        verification = verify(src, staging, tolerance=tolerance) if verify_output else None
        if verification is not None and not verification.ok:
            raise BertJaxError(f"{dst}: not written: --verify failed: {verification.failure()}")
    return Conversion(config, source_format, target_format, verification)


def _read(src: Path, source_format: str, progress: bool):
    """(config, params as NumPy arrays on the host): from an HF directory, views of the
    memory-mapped file (`mapping`: the writer does the transposes as it copies); Orbax also
    writes NumPy arrays about twice as fast as device arrays."""
    if source_format == "hf":
        return hf_dir.load_hf_dir(src, on_device=False, progress=progress)
    config = unscanned(hf_dir.load_config(src))  # the layout Orbax dirs hold
    return config, orbax_dir.load_params(src, abstract_params(config), on_device=False)


def _cast(params, dtype: str | None):
    """`params` cast to `dtype` ("fp32"/"bf16"), or as they are when none is given."""
    return params if dtype is None else jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
