"""Hugging Face model directories <-> (config, params).

Loading checks every tensor against the shapes the config implies, accepts the key variants
found on the Hub, and initialises only head weights that a file lacks (with a warning, as
`transformers` does). Saving writes a directory that stock `transformers` loads, atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
import flax.linen as nn

from bert_jax.convert import mapping
from bert_jax.convert.weight_files import find_weights, read_state_dict, write_safetensors
from bert_jax.errors import BertJaxError
from bert_jax.families import family_of, family_of_config
from bert_jax.files import atomic_directory, copy_tokenizer_files, read_json

logger = logging.getLogger("bert_jax")

_SAVE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and find_weights(path) is not None


def load_config(model_dir: Path, **runtime):
    path = model_dir / "config.json"
    hf = read_json(path)
    return family_of(hf, str(path)).config_cls.from_hf_dict(hf, **runtime)


def load_hf_dir(model_dir: str | Path, seed: int = 0, **runtime):
    """(config, params) from an HF directory; `runtime` overrides dtype / backend fields."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BertJaxError(f"{model_dir}: not a directory")
    config = load_config(model_dir, **runtime)
    source = str(find_weights(model_dir) or model_dir)
    return config, params_from_hf(config, read_state_dict(model_dir), source, seed)


def params_from_hf(config, state_dict: dict[str, np.ndarray], source: str,
                   seed: int = 0) -> dict[str, Any]:
    """Params for `config` from HF tensors (any head, see the module docstring)."""
    family = family_of_config(config)
    table = family.mapping
    state_dict = table.canonical_state_dict(state_dict, source)
    rules = table.rules(config)
    abstract = nn.meta.unbox(family.abstract_variables(config)["params"])
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    flat, missing = mapping.params_from_state_dict(rules, state_dict, shapes, source,
                                                   np.dtype(config.param_dtype))
    required = [r.hf_key for r in missing if not table.may_be_newly_initialised(r.hf_key)]
    if required:
        raise BertJaxError(f"{source}: missing tensor {required[0]!r}"
                           + (f" and {len(required) - 1} more" if len(required) > 1 else ""))
    if missing:
        logger.warning("Some weights of %s were not in %s and are newly initialized: %s",
                       config.architecture, source, [r.hf_key for r in missing])
        fresh = traverse_util.flatten_dict(family.init_params(config, seed))
        flat.update({r.path: np.asarray(fresh[r.path]) for r in missing})
    unused = set(state_dict) - {r.hf_key for r in rules} - table.ignorable_keys(config)
    if unused:
        logger.info("Weights in %s not used by %s: %s", source, config.architecture, sorted(unused))
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def hf_state_dict(config, params, dtype=None) -> dict[str, np.ndarray]:
    """The tensors of an HF checkpoint, keyed as `transformers` saves them."""
    table = family_of_config(config).mapping
    tensors = mapping.state_dict_from_params(table.rules(config), traverse_util.flatten_dict(params),
                                             dtype)
    return {saved: value for key, value in tensors.items()
            for saved in table.hf_keys_for_save(config, key)}


def save_hf_dir(config, params, out_dir: str | Path, *, tokenizer_dir: Path | None = None,
                max_shard_bytes: int | None = None, overwrite: bool = True) -> Path:
    """Write config.json, safetensors weights and tokenizer files; nothing is left on failure.

    Weights are stored in the dtype the source checkpoint declared (`dtype`/`torch_dtype`
    of its config.json) when that is fp16/bf16, else fp32, so a round trip is bit-identical.
    """
    declared = config.extra.get("dtype") or config.extra.get("torch_dtype")
    tensors = hf_state_dict(config, params, _SAVE_DTYPES.get(declared))
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        config.save_json(staging / "config.json")
        write_safetensors(staging, tensors, max_shard_bytes)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, staging)
    return Path(out_dir)

