"""Applying a family's mapping table: HF state dict <-> bert_jax params.

A table is a list of `Rule`s, one per parameter: the HF key, the param path, and the
transform between the two layouts. Both directions are exact (transposes and reshapes only),
so HF -> bert_jax -> HF is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from bert_jax.errors import BertJaxError


@dataclasses.dataclass(frozen=True)
class Transform:
    to_jax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# Embeddings and LayerNorm params: the same array.
IDENTITY = Transform(lambda w, shape: w, lambda p: p)
# Biases: a vector in HF, maybe split into [heads, head_dim] here.
BIAS = Transform(lambda w, shape: w.reshape(shape), lambda p: p.reshape(-1))


def linear(in_axes: int = 1) -> Transform:
    """torch Linear weight [out, in] <-> kernel [*in_dims, *out_dims] (`in_axes` input dims)."""
    return Transform(
        lambda w, shape: w.T.reshape(shape),
        lambda k: k.reshape(math.prod(k.shape[:in_axes]), -1).T,
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_key: str
    path: tuple[str, ...]
    transform: Transform = IDENTITY


def params_from_state_dict(rules: list[Rule], state_dict: dict[str, np.ndarray],
                           shapes: dict[tuple[str, ...], tuple[int, ...]], source: str,
                           param_dtype) -> tuple[dict[tuple[str, ...], np.ndarray], list[Rule]]:
    """Flat params for every rule whose key is in `state_dict`, and the rules left missing.

    `shapes` are the param shapes the config implies; a tensor that does not fit is an error
    naming the key, both shapes and the file.
    """
    params, missing = {}, []
    for rule in rules:
        if rule.hf_key not in state_dict:
            missing.append(rule)
            continue
        tensor = np.asarray(state_dict[rule.hf_key])
        expected = _hf_shape(rule, shapes[rule.path])
        if tensor.shape != expected:
            raise BertJaxError(f"{source}: tensor {rule.hf_key!r} has shape {tensor.shape}, "
                               f"but config.json implies {expected}")
        value = rule.transform.to_jax(tensor, shapes[rule.path])
        params[rule.path] = value.astype(param_dtype)
    return params, missing


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return rule.transform.to_hf(np.empty(shape, np.uint8)).shape


def state_dict_from_params(rules: list[Rule], flat_params: dict[tuple[str, ...], Any],
                           dtype=None) -> dict[str, np.ndarray]:
    """HF tensors (C-contiguous, optionally cast to `dtype`) for every rule."""
    out = {}
    for rule in rules:
        value = rule.transform.to_hf(np.asarray(flat_params[rule.path]))
        if dtype is not None:
            value = value.astype(dtype)
        out[rule.hf_key] = np.ascontiguousarray(value)
    return out
