"""Reading and writing the weight files of a Hugging Face model directory.

Read: `model.safetensors`, sharded `model.safetensors.index.json`, and `pytorch_model.bin`
(sharded or not) through `torch.load(weights_only=True)` only: a pickle is never executed.
Write: `model.safetensors`, or shards plus an index above `max_shard_bytes`, as
`transformers.save_pretrained` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from bert_jax.errors import BertJaxError
from bert_jax.files import read_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)


def find_weights(model_dir: Path) -> Path | None:
    """The weight file (or index) of an HF directory, safetensors preferred; None if absent."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF directory by key, as NumPy arrays in their stored dtype."""
    path = find_weights(model_dir)
    if path is None:
        raise BertJaxError(f"{model_dir}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    if path.name.endswith(".index.json"):
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BertJaxError(f"{path}: no 'weight_map' of tensor names to shard files in the index")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                raise BertJaxError(f"{path}: shard {shard} listed in the index is missing")
            tensors.update(_read_file(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise BertJaxError(f"{path}: tensor {missing[0]!r} listed in the index is in no shard")
        return tensors
    return _read_file(path)


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pytorch(path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise BertJaxError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _read_pytorch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise BertJaxError(f"{path}: reading pytorch_model.bin needs PyTorch "
                           "(pip install torch==2.13.0), or convert the checkpoint to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        raise BertJaxError(f"{path}: cannot be read safely as a PyTorch state dict ({err})") from None
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
                      max_shard_bytes: int | None = None) -> None:
    """Write `tensors` as one file, or as shards with an index when larger than the limit."""
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(model_dir / SAFETENSORS), metadata=metadata)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
