"""Reading and writing the weight files of a Hugging Face model directory.

Read: `model.safetensors`, sharded `model.safetensors.index.json`, and `pytorch_model.bin`
(sharded or not) through `torch.load(weights_only=True)` only: a pickle is never executed.
Write: `model.safetensors`, or shards plus an index above `max_shard_bytes`, split and indexed
as `transformers.save_pretrained` does (huggingface_hub's splitter, the same index keys), so
re-saving a sharded checkpoint reproduces its weight map.

Progress bars (tqdm, stderr) count tensors read and shards written; tqdm hides them when
stderr is not a terminal, and `delay` keeps them away for models that load in a second.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from bert_jax.errors import BertJaxError
from bert_jax.files import read_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)
_SHARD_PATTERN = "model{suffix}.safetensors"
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def progress_bar(progress: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr: off unless `progress`, shown only on a terminal and after 1 s."""
    return tqdm(disable=None if progress else True, delay=1.0, leave=False, **kwargs)


def find_weights(model_dir: Path) -> Path | None:
    """The weight file (or index) of an HF directory, safetensors preferred; None if absent."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def read_state_dict(model_dir: Path, progress: bool = False) -> dict[str, np.ndarray]:
    """All tensors of an HF directory by key, as NumPy arrays in their stored dtype."""
    path, files = _weight_files(model_dir)
    tensors: dict[str, np.ndarray] = {}
    with progress_bar(progress, desc=f"reading {path.name}", unit="tensor") as bar:
        for file in files:
            tensors.update(_read_file(file, bar))
    if path.name.endswith(".index.json"):
        missing = sorted(set(read_weight_map(path)) - set(tensors))
        if missing:
            raise BertJaxError(f"{path}: tensor {missing[0]!r} listed in the index is in no shard")
    return tensors


def read_tensor_specs(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype name) of every tensor, from the safetensors headers alone
    (`pytorch_model.bin` has no header: its tensors are read)."""
    path, files = _weight_files(model_dir)
    if path.name.startswith("pytorch_model"):
        return {k: (v.shape, v.dtype.name) for k, v in read_state_dict(model_dir).items()}
    specs = {}
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():
                view = f.get_slice(key)
                dtype = view.get_dtype()
                specs[key] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype))
    return specs


def read_weight_map(index_path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a sharded checkpoint's index."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BertJaxError(f"{index_path}: no 'weight_map' of tensor names to shard files "
                           f"in the index")
    return weight_map


def _weight_files(model_dir: Path) -> tuple[Path, list[Path]]:
    """The weight file (or index) of an HF directory, and the files that hold its tensors."""
    path = find_weights(model_dir)
    if path is None:
        raise BertJaxError(f"{model_dir}: no weights found (expected one of "
                           f"{', '.join(WEIGHT_FILES)})")
    if not path.name.endswith(".index.json"):
        return path, [path]
    files = [model_dir / shard for shard in sorted(set(read_weight_map(path).values()))]
    for file in files:
        if not file.is_file():
            raise BertJaxError(f"{path}: shard {file.name} listed in the index is missing")
    return path, files


def _read_file(path: Path, bar: tqdm) -> dict[str, np.ndarray]:
    if path.suffix != ".safetensors":
        tensors = _read_pytorch(path)
        bar.update(len(tensors))
        return tensors
    with _open_safetensors(path) as f:  # validates the header against the file
        keys = list(f.keys())
    bar.total = (bar.total or 0) + len(keys)
    tensors = _map_safetensors(path, keys)
    bar.update(len(keys))
    return tensors


def _map_safetensors(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Read-only views of the memory-mapped file, located by its documented header (a u64
    length, then JSON with each tensor's dtype, shape and byte offsets after the header).

    No copy is made here: a conversion's transposes and casts read the pages straight from
    the page cache, in parallel, and untouched tensors are written out from the mapping, so
    a 1.3 GB checkpoint is not first copied into 1.3 GB of fresh memory (`get_tensor` does).
    """
    file = np.memmap(path, dtype=np.uint8, mode="r")
    header_bytes = int(file[:8].view("<u8")[0])
    header = json.loads(file[8:8 + header_bytes].tobytes())
    data = file[8 + header_bytes:]
    tensors = {}
    for key in keys:
        spec = header[key]
        begin, end = spec["data_offsets"]
        if spec["dtype"] not in _SAFETENSORS_DTYPES:
            raise BertJaxError(f"{path}: tensor {key!r} is {spec['dtype']}, a dtype bert_jax "
                               f"does not read ({', '.join(_SAFETENSORS_DTYPES)})")
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])  # bfloat16: ml_dtypes' name
        tensors[key] = data[begin:end].view(dtype).reshape(spec["shape"])
    return tensors


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator:
    """`safe_open`, with a damaged file reported as such."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as err:
        raise BertJaxError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _read_pytorch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise BertJaxError(f"{path}: reading pytorch_model.bin needs PyTorch "
                           "(pip install torch==2.13.0), or convert the checkpoint to "
                           "safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        raise BertJaxError(
            f"{path}: cannot be read safely as a PyTorch state dict ({err})") from None
    if not isinstance(state, dict):
        raise BertJaxError(f"{path}: expected a state dict, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BertJaxError(f"{path}: not a flat state dict of tensors ({key!r} is a "
                               f"{type(value).__name__}; a training checkpoint?)")
    return {key: _torch_to_numpy(value) for key, value in state.items()}


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()


def write_safetensors(model_dir: Path, tensors: dict[str, np.ndarray],
                      max_shard_bytes: int | None = None, progress: bool = False) -> None:
    """Write `tensors` as one file, or as shards with an index when larger than the limit.

    Shards follow the order of `tensors` (transformers': module order) and transformers' rules:
    a new shard starts where the next tensor would exceed the limit, a tensor larger than the
    limit gets a shard of its own, and one array stored under two keys (a tied alias) counts
    once and stays with its first key.
    """
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda t: t.nbytes, get_storage_id=id,
        filename_pattern=_SHARD_PATTERN,
        max_shard_size=float("inf") if max_shard_bytes is None else max_shard_bytes)
    with progress_bar(progress, desc="writing", total=len(split.filename_to_tensors),
                      unit="shard") as bar:
        for name, keys in split.filename_to_tensors.items():
            save_file({key: tensors[key] for key in keys}, str(model_dir / name), metadata=metadata)
            bar.update()
    if split.is_sharded:
        unique = {id(t): t for t in tensors.values()}.values()
        index = {"metadata": {"total_parameters": sum(t.size for t in unique), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
        (model_dir / SAFETENSORS_INDEX).write_text(text, encoding="utf-8")
