"""Building blocks with logical axis names on every parameter.

Logical axes used across bert_jax (mapped to mesh axes by the one rules table in
`bert_jax/sharding.py`): "vocab", "embed" (hidden size), "heads", "kv" (head dim), "mlp"
(intermediate size), "positions", "token_types", "classes".
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    return _ACTIVATIONS[name]


def dense(features: int | Sequence[int], axes: Sequence[str], *, std: float, dtype, param_dtype,
          name: str, in_axes: int | Sequence[int] = -1, use_bias: bool = True) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel has logical `axes` (inputs first) and a zero bias.

    Kernels keep the head axes unflattened ([embed, heads, kv] for q/k/v, [heads, kv, embed]
    for the output projection) so tensor parallelism can shard heads.
    """
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=in_axes,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[-n_out:])),
        name=name,
    )


def layer_norm(epsilon: float, *, param_dtype, name: str) -> nn.LayerNorm:
    """LayerNorm computed and returned in fp32 with PyTorch's two-pass variance."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def embed(num: int, features: int, axes: tuple[str, str], *, std: float, dtype, param_dtype,
          name: str) -> nn.Embed:
    return nn.Embed(
        num_embeddings=num,
        features=features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        name=name,
    )
