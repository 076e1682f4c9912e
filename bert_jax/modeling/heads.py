"""BERT task heads (shared by BERT and Megatron-BERT)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bert_jax.modeling.config import BertConfig
from bert_jax.modeling.layers import activation, dense, layer_norm


class MaskedLMHead(nn.Module):
    """transform (dense -> act -> LayerNorm), then the vocabulary projection plus a bias.

    The projection is the word embedding table (`tie_word_embeddings`, the HF default) passed
    in as `embedding_VD`, or a kernel of its own.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x_BTD, embedding_VD):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = dense(c.hidden_size, ("embed", "mlp"), std=c.initializer_range, dtype=dtype,
                  param_dtype=c.param_dtype, name="transform")(x_BTD)
        x = activation(c.hidden_act)(x)
        x = layer_norm(c.layer_norm_eps, param_dtype=c.param_dtype, name="transform_norm")(x)
        x = x.astype(dtype)
        if c.tie_word_embeddings:
            logits_BTV = x @ embedding_VD.astype(dtype).T
        else:
            logits_BTV = dense(c.vocab_size, ("embed", "vocab"), std=c.initializer_range,
                               dtype=dtype, param_dtype=c.param_dtype, name="decoder",
                               use_bias=False)(x)
        bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                 ("vocab",)),
                            (c.vocab_size,), c.param_dtype)
        return logits_BTV.astype(jnp.float32) + bias_V


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] summary that NSP and classification read."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        x_BD = dense(c.hidden_size, ("embed", "mlp"), std=c.initializer_range, dtype=c.dtype,
                     param_dtype=c.param_dtype, name="dense")(x_BTD[:, 0])
        return jnp.tanh(x_BD)


class Classifier(nn.Module):
    """Dropout then a dense layer to `num_outputs` logits (fp32)."""

    config: BertConfig
    num_outputs: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        logits = dense(self.num_outputs, ("embed", "classes"), std=c.initializer_range,
                       dtype=c.dtype, param_dtype=c.param_dtype, name="dense")(x)
        return logits.astype(jnp.float32)
