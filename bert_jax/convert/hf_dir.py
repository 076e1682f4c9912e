"""Hugging Face model directories <-> (config, params).

Loading checks every tensor against the shapes the config implies, accepts the key variants
found on the Hub, and initialises only head weights that a file lacks (with a warning, as
`transformers` does). Saving writes a directory that stock `transformers` loads, atomically.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

from bert_jax.convert import mapping
from bert_jax.convert.families import family_of, family_of_config
from bert_jax.convert.weight_files import find_weights, read_state_dict, write_safetensors
from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory, copy_tokenizer_files, read_json
from bert_jax.modeling.scan import to_scanned, to_unrolled, unscanned

logger = logging.getLogger("bert_jax")

_SAVE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers 5 writes `dtype`; older files `torch_dtype`


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and find_weights(path) is not None


def load_config(model_dir: Path, **runtime):
    path = model_dir / "config.json"
    hf = read_json(path)
    return family_of(hf, str(path)).config_cls.from_hf_dict(hf, **runtime)


def load_hf_dir(model_dir: str | Path, seed: int = 0, *, on_device: bool = True,
                progress: bool = False, **runtime):
    """(config, params) from an HF directory; `runtime` overrides dtype / backend fields."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BertJaxError(f"{model_dir}: not a directory")
    config = load_config(model_dir, **runtime)
    source = str(find_weights(model_dir) or model_dir)
    return config, params_from_hf(config, read_state_dict(model_dir, progress), source, seed,
                                  on_device)


def params_from_hf(config, state_dict: dict[str, np.ndarray], source: str,
                   seed: int = 0, on_device: bool = True) -> dict[str, Any]:
    """Params for `config` from HF tensors (any head, see the module docstring).

    on_device=False keeps NumPy arrays (views of `state_dict`, transposed where the layouts
    differ, copies only where a cast is due), to write them straight to another file. With
    `config.scan_layers` the layers come stacked (modeling/scan.py), with
    `config.vocab_multiple` the vocabulary rows padded (zeros); files always hold them
    unrolled, at the real vocabulary size.
    """
    if config.scan_layers:
        return to_scanned(config, params_from_hf(unscanned(config), state_dict, source, seed,
                                                 on_device))
    family = family_of_config(config)
    if config.padded_vocab_size != config.vocab_size:
        return family.pad_vocab(config, params_from_hf(
            config.with_vocab_multiple(1), state_dict, source, seed, on_device))
    table = family.mapping
    state_dict = table.canonical_state_dict(state_dict, source)
    rules = table.rules(config)
    array = jnp.asarray if on_device else np.asarray  # transposes by XLA or by NumPy
    flat, missing = mapping.params_from_state_dict(rules, state_dict, param_shapes(config), source,
                                                   np.dtype(config.param_dtype), array)
    required = [r.hf_key for r in missing if not table.may_be_newly_initialised(r.hf_key)]
    if required:
        raise BertJaxError(f"{source}: missing tensor {required[0]!r}"
                           + (f" and {len(required) - 1} more" if len(required) > 1 else ""))
    if missing:
        logger.warning("Some weights of %s were not in %s and are newly initialized: %s",
                       config.architecture, source, [r.hf_key for r in missing])
        fresh = traverse_util.flatten_dict(family.init_params(config, seed))
        flat.update({r.path: array(fresh[r.path]) for r in missing})
    unused = set(state_dict) - {r.hf_key for r in rules} - table.ignorable_keys(config)
    if unused:
        logger.info("Weights in %s not used by %s: %s", source, config.architecture, sorted(unused))
    return traverse_util.unflatten_dict(flat)


def param_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path -> shape of the model `config` describes, layers unrolled and the
    vocabulary unpadded as in files (nothing is allocated)."""
    abstract = family_of_config(config).unrolled_abstract_params(config.with_vocab_multiple(1))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}


def hf_state_dict(config, params, dtype=None) -> dict[str, np.ndarray]:
    """The tensors of an HF checkpoint, keyed as `transformers` saves them (unrolled, at the
    real vocabulary size, whatever layout `config` holds its params in)."""
    if config.scan_layers:
        return hf_state_dict(unscanned(config), to_unrolled(config, params), dtype)
    family = family_of_config(config)
    if config.padded_vocab_size != config.vocab_size:
        return hf_state_dict(config.with_vocab_multiple(1), family.unpad_vocab(config, params),
                             dtype)
    table = family.mapping
    flat = traverse_util.flatten_dict(params)
    tensors = mapping.state_dict_from_params(table.rules(config), flat, dtype)
    return {saved: value for key, value in tensors.items()
            for saved in table.hf_keys_for_save(config, key)}


def declared_dtype(config) -> str:
    """The weights' dtype that config.json declares (`dtype` / `torch_dtype`), float32 if none."""
    return next((config.extra[k] for k in _DTYPE_KEYS if config.extra.get(k)), "float32")


def with_declared_dtype(config, dtype: str):
    """`config` declaring `dtype` for its weights (in `dtype` and, if present, `torch_dtype`)."""
    keys = [k for k in _DTYPE_KEYS if k in config.extra] or ["dtype"]
    return dataclasses.replace(config, extra={**config.extra, **dict.fromkeys(keys, dtype)})


def save_hf_dir(config, params, out_dir: str | Path, *, tokenizer_dir: Path | None = None,
                max_shard_bytes: int | None = None, overwrite: bool = True,
                progress: bool = False) -> epath.Path:
    """Write config.json, safetensors weights and tokenizer files to `out_dir` (local or gs://);
    nothing is left on failure.

    Weights are stored in the dtype config.json declares (`declared_dtype`) when that is
    fp16/bf16, else fp32, so a round trip is bit-identical.
    """
    tensors = hf_state_dict(config, params, _SAVE_DTYPES.get(declared_dtype(config)))
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        config.save_json(staging / "config.json")
        write_safetensors(staging, tensors, max_shard_bytes, progress)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, staging)
    return epath.Path(out_dir)

