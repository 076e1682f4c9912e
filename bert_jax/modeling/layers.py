"""Building blocks with logical axis names on every parameter.

Logical axes used across bert_jax (mapped to mesh axes by the one rules table in
`bert_jax/sharding.py`): "vocab", "embed" (hidden size), "heads", "kv" (head dim), "mlp"
(intermediate size), "positions", "token_types", "classes", "lambdas", "layers" (the
stacked axis of scanned layers); on activations "batch", "length" and "act_embed".
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.sharding import activation_spec

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


def merge_choices(x_BCT):
    """Multiple choice: [B, C, T] inputs -> [B * C, T] (None stays None)."""
    return None if x_BCT is None else x_BCT.reshape(-1, x_BCT.shape[-1])


def constrain_hidden(x_BTD):
    """Keep the residual stream split by examples under a mesh (`jax.set_mesh`; a no-op
    without one), so the partitioner never trades the batch split for the params' split."""
    spec = activation_spec(("batch", "length", "act_embed"), x_BTD.shape)
    return x_BTD if spec is None else jax.lax.with_sharding_constraint(x_BTD, spec)


def remat_layer(layer_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...],
                scanned: bool = False):
    """The layer class with activation checkpointing under `policy` (see config.REMAT_POLICIES).

    static_argnums: positions (counting `self` as 0) of Python-valued call arguments.
    scanned: the layer runs inside `nn.scan`, whose loop already keeps XLA from merging the
        recomputation into the forward pass, so remat's own CSE barrier is not needed.
    """
    if policy == "none":
        return layer_cls
    saveable = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return nn.remat(layer_cls, policy=saveable, static_argnums=static_argnums,
                    prevent_cse=not scanned)


def dense(features: int | Sequence[int], axes: Sequence[str], *, std: float, dtype, param_dtype,
          name: str, in_axes: int | Sequence[int] = -1, use_bias: bool = True) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel has logical `axes` (inputs first) and a zero bias.

    Kernels keep the head axes unflattened ([embed, heads, kv] for q/k/v, [heads, kv, embed]
    for the output projection) so tensor parallelism can shard heads; the product itself runs
    on their 2-D views (`_matmul`).
    """
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=in_axes,
        dot_general=_matmul,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[-n_out:])),
        name=name,
    )


def _matmul(x, kernel, dimension_numbers, precision=None):
    """DenseGeneral's contraction of x's trailing axes with the kernel's leading ones, as one
    [rows, in] @ [in, out] matmul between reshapes (free: the layouts already agree).

    The same arithmetic as `lax.dot_general`, but XLA:CPU's backward of a 3-D kernel's
    contraction copied a transposed kernel for every q/k/v/out projection and step; on the 2-D
    view the transpose is a matmul flag. BERT-base's CPU train step: 4.0 s -> 3.65 s.
    """
    (x_axes, kernel_axes), batch_axes = dimension_numbers
    n = len(x_axes)
    trailing, leading = tuple(range(x.ndim - n, x.ndim)), tuple(range(n))
    if tuple(x_axes) != trailing or tuple(kernel_axes) != leading or any(batch_axes):
        raise ValueError(f"not a dense layer's contraction: {dimension_numbers}")
    n_in = math.prod(kernel.shape[:n])
    y = jnp.matmul(x.reshape(-1, n_in), kernel.reshape(n_in, -1), precision=precision)
    return y.reshape(*x.shape[:-n], *kernel.shape[n:])


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
