"""Applying a family's mapping table: HF state dict <-> bert_jax params.

A table is a list of `Rule`s, one per parameter: the HF key, the param path, and the
transform between the two layouts. Both directions are exact (transposes and reshapes only),
so HF -> bert_jax -> HF is bit-identical. Transforms take NumPy or JAX arrays and keep the
kind. On NumPy arrays they return views: nothing is copied until a writer needs the bytes.
Orbax (TensorStore) copies its input into its own buffers anyway and reads a transposed view
as it does, and an HF tensor read back through two transposes is the file's own memory, so a
conversion moves each byte as few times as it can; `state_dict_from_params` makes the HF
tensors C-contiguous, transposing on all cores (`_map_parallel`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from bert_jax.errors import BertJaxError

Shape = tuple[int, ...]
_BAND = 256  # rows per block of a NumPy transpose


def contiguous(x: np.ndarray, dtype=None) -> np.ndarray:
    """`x` C-contiguous (cast to `dtype`). A transposed 2-D view is copied a band of its source
    rows at a time, which stays in cache: about 2x NumPy's plain strided copy."""
    if x.flags.c_contiguous or x.ndim != 2 or not x.T.flags.c_contiguous:
        return np.ascontiguousarray(x, dtype=dtype)
    source = x.T
    out = np.empty(x.shape, dtype or x.dtype)
    for start in range(0, source.shape[0], _BAND):
        out[:, start:start + _BAND] = source[start:start + _BAND].T
    return out


def _map_parallel(fn: Callable, items: list) -> list:
    """`[fn(x) for x in items]` on every core: NumPy releases the GIL in the copies and casts
    that `fn` does, and XLA dispatch is thread-safe."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(fn, items))


@dataclasses.dataclass(frozen=True)
class Transform:
    to_jax: Callable[[Any, Shape], Any]  # HF tensor, param shape -> param
    to_hf: Callable[[Any], Any]  # param -> HF tensor
    hf_shape: Callable[[Shape], Shape]  # param shape -> HF tensor shape


# Embeddings and LayerNorm params: the same array.
IDENTITY = Transform(lambda w, shape: w, lambda p: p, lambda shape: shape)
# Biases: a vector in HF, maybe split into [heads, head_dim] here.
BIAS = Transform(lambda w, shape: w.reshape(shape), lambda p: p.reshape(-1),
                 lambda shape: (math.prod(shape),))


def linear(in_axes: int = 1) -> Transform:
    """torch Linear weight [out, in] <-> kernel [*in_dims, *out_dims] (`in_axes` input dims)."""
    return Transform(
        lambda w, shape: w.T.reshape(shape),
        lambda k: k.reshape(math.prod(k.shape[:in_axes]), -1).T,
        lambda shape: (math.prod(shape[in_axes:]), math.prod(shape[:in_axes])),
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_key: str
    path: tuple[str, ...]
    transform: Transform = IDENTITY


def params_from_state_dict(
        rules: list[Rule], state_dict: dict[str, np.ndarray], shapes: dict[tuple[str, ...], Shape],
        source: str, param_dtype, array: Callable = np.asarray,
) -> tuple[dict[tuple[str, ...], Any], list[Rule]]:
    """Flat params for every rule whose key is in `state_dict`, and the rules left missing.

    `array` (np.asarray or jnp.asarray) makes each tensor the kind of array the params are,
    before its transform runs. `shapes` are the param shapes the config implies; a tensor
    that does not fit is an error naming the key, both shapes and the file.
    """
    present = [rule for rule in rules if rule.hf_key in state_dict]
    missing = [rule for rule in rules if rule.hf_key not in state_dict]
    for rule in present:
        tensor, expected = state_dict[rule.hf_key], hf_shape(rule, shapes[rule.path])
        if tensor.shape != expected:
            raise BertJaxError(f"{source}: tensor {rule.hf_key!r} has shape {tensor.shape}, "
                               f"but config.json implies {expected}")

    def to_param(rule: Rule):
        value = rule.transform.to_jax(array(state_dict[rule.hf_key]), shapes[rule.path])
        return array(value, dtype=param_dtype)  # no copy where no cast is due

    return dict(zip((rule.path for rule in present), _map_parallel(to_param, present))), missing


def hf_shape(rule: Rule, shape: Shape) -> Shape:
    """The shape of the HF tensor behind a param of `shape`."""
    return rule.transform.hf_shape(shape)


def state_dict_from_params(rules: list[Rule], flat_params: dict[tuple[str, ...], Any],
                           dtype=None) -> dict[str, np.ndarray]:
    """HF tensors (C-contiguous NumPy arrays, optionally cast to `dtype`) for every rule."""
    def to_hf(rule: Rule) -> np.ndarray:
        return contiguous(np.asarray(rule.transform.to_hf(flat_params[rule.path])), dtype)

    return dict(zip((rule.hf_key for rule in rules), _map_parallel(to_hf, rules)))
