"""`nn.scan` over the layer stack (`config.scan_layers`), and the param layout it implies.

Scanning traces and compiles one layer instead of `num_layers` copies, so compile time and
program size stop growing with depth. Its params are the unrolled model's `layer_{i}`
subtrees stacked on a leading axis (logical name "layers") of one `layers` subtree.
Checkpoints (HF and Orbax) always hold the unrolled layout: `stack_layers` and
`unstack_layers` convert where params meet files (`convert/hf_dir.py` for HF tensors,
`pretrained.py` for Orbax model directories).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYERS = "layers"  # the scanned module's name, and the logical axis of its stacked params
_LAYER = re.compile(r"layer_\d+")


def scan_layers(body: Callable, layer: nn.Module, carry, *broadcast, length: int):
    """Run `body(layer, carry, *broadcast) -> (carry, y)` `length` times, each time with the
    next layer's params and dropout key; returns (carry, the `y`s stacked on a leading axis).

    `layer` is an unbound child named `LAYERS`; Python values the layer needs (e.g.
    `deterministic`) are closed over by `body` so they stay static.
    """
    scanned = nn.scan(body, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=length,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
    return scanned(layer, carry, *broadcast)


def unscanned(config):
    """`config` with the unrolled layer stack: the layout checkpoints are read and written in."""
    return dataclasses.replace(config, scan_layers=False) if config.scan_layers else config


def stack_layers(params: dict[str, Any], per_step: int = 1) -> dict[str, Any]:
    """Unrolled -> scanned: the `layer_0` .. `layer_{n-1}` subtrees (wherever they sit) become
    one `layers` subtree whose leaves carry the scan step as their leading axis.

    per_step: layers per scan step (`config.layers_per_scan_step`). Above 1 the `layers`
        subtree holds `layer_0` .. `layer_{per_step-1}`, each stacked over the steps: layer i
        is member `i % per_step` of step `i // per_step`.
    """
    if "layer_0" not in params:
        return {k: stack_layers(v, per_step) if isinstance(v, dict) else v
                for k, v in params.items()}
    num_layers = sum(_LAYER.fullmatch(k) is not None for k in params)
    rest = {k: v for k, v in params.items() if _LAYER.fullmatch(k) is None}

    def stacked(indices):
        return jax.tree.map(lambda *xs: _stack(xs), *(params[f"layer_{i}"] for i in indices))

    if per_step == 1:
        return {**rest, LAYERS: stacked(range(num_layers))}
    return {**rest, LAYERS: {f"layer_{j}": stacked(range(j, num_layers, per_step))
                             for j in range(per_step)}}


def _stack(arrays):
    """NumPy arrays stacked on the host (a file's, to be placed on a mesh), others by JAX."""
    return (np.stack if isinstance(arrays[0], np.ndarray) else jnp.stack)(arrays)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned -> unrolled: the inverse of `stack_layers` (its `per_step` read from the tree)."""
    if LAYERS not in params:
        return {k: unstack_layers(v) if isinstance(v, dict) else v for k, v in params.items()}
    stacked = params[LAYERS]
    members = ([stacked[f"layer_{j}"] for j in range(len(stacked))] if "layer_0" in stacked
               else [stacked])
    steps = jax.tree.leaves(members[0])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != LAYERS}
    return {**rest, **{f"layer_{step * len(members) + j}": jax.tree.map(lambda x: x[step], member)
                       for step in range(steps) for j, member in enumerate(members)}}


def to_scanned(config, params: dict[str, Any]) -> dict[str, Any]:
    """Params in the layout `config`'s modules take, from the unrolled (file) layout."""
    return stack_layers(params, config.layers_per_scan_step) if config.scan_layers else params


def to_unrolled(config, params: dict[str, Any]) -> dict[str, Any]:
    """`config`'s params in the unrolled layout that files hold."""
    return unstack_layers(params) if config.scan_layers else params
