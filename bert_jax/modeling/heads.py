"""BERT task heads (shared by BERT and Megatron-BERT), and what every family's sequence
classification does on packed rows (`data.packing`): one vector and one loss per segment."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.modeling import losses
from bert_jax.modeling.config import BertConfig
from bert_jax.modeling.layers import activation, dense, layer_norm


class MaskedLMHead(nn.Module):
    """transform (dense -> act -> LayerNorm), then the vocabulary projection plus a bias.

    The projection is the word embedding table (`tie_word_embeddings`, the HF default) passed
    in as `embedding_VD`, or a kernel of its own. Returns fp32 logits over the padded
    vocabulary (`config.padded_vocab_size`), the padding columns masked (`mask_padded_vocab`).
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
            logits_BTV = dense(c.padded_vocab_size, ("embed", "vocab"), std=c.initializer_range,
                               dtype=dtype, param_dtype=c.param_dtype, name="decoder",
                               use_bias=False)(x)
        bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                 ("vocab",)),
                            (c.padded_vocab_size,), c.param_dtype)
        return mask_padded_vocab(logits_BTV.astype(jnp.float32) + bias_V, c.vocab_size)


def mask_padded_vocab(logits_BxV, vocab_size: int):
    """Logits over a padded vocabulary (`config.vocab_multiple`) with the padding columns at
    the fp32 minimum, so that no softmax, loss or argmax ever picks them (and they get no
    gradient). The losses are computed on these, at the padded width, which a mesh's
    `tensor` axis divides; `real_vocab` cuts the outputs down. Unchanged without padding."""
    if logits_BxV.shape[-1] == vocab_size:
        return logits_BxV
    real_V = jnp.arange(logits_BxV.shape[-1]) < vocab_size
    return jnp.where(real_V, logits_BxV, jnp.finfo(logits_BxV.dtype).min)


def real_vocab(logits_BxV, vocab_size: int):
    """The logits of the real vocabulary: what every model output holds (`vocab_size` wide)."""
    return logits_BxV if logits_BxV.shape[-1] == vocab_size else logits_BxV[..., :vocab_size]


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] summary that NSP and classification read; on packed
    rows, that of each segment's [CLS] (`[B, P, D]`)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BTD, cls_positions_BP=None):
        c = self.config
        x = dense(c.hidden_size, ("embed", "mlp"), std=c.initializer_range, dtype=c.dtype,
                  param_dtype=c.param_dtype, name="dense")(at_cls(x_BTD, cls_positions_BP))
        return jnp.tanh(x)


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


def at_cls(x_BTD, cls_positions_BP=None):
    """What sequence-level heads read: position 0 `[B, D]`, or on packed rows each segment's
    first token `[B, P, D]`."""
    return x_BTD[:, 0] if cls_positions_BP is None else at_positions(x_BTD, cls_positions_BP)


def at_positions(x_BTD, positions_BP):
    """`x_BTD[b, positions_BP[b, p]]` as `[B, P, D]` (a position of -1, an empty slot, reads
    position 0)."""
    return jnp.take_along_axis(x_BTD, jnp.maximum(positions_BP, 0)[..., None], axis=1)


def labels_at(labels_BT, positions_BP):
    """`labels_BT` at `positions_BP` as `[B, P]`, the ignore index in empty slots (-1)."""
    return jnp.where(positions_BP >= 0, at_positions(labels_BT[..., None], positions_BP)[..., 0],
                     losses.IGNORE_INDEX)


def segment_classification_loss(logits_BPC, labels, cls_positions_BP,
                                problem_type: str | None) -> jax.Array:
    """The sequence classification loss of the packed examples (slots with a cls position):
    the mean of each example's own transformers loss, which is that loss over the same
    examples unpacked (a mean over examples, or over examples x labels for multi-label)."""
    valid_N = cls_positions_BP.reshape(-1) >= 0
    logits_NC = logits_BPC.reshape(valid_N.size, logits_BPC.shape[-1])
    labels_N = labels.reshape(valid_N.size, *labels.shape[2:])
    # empty slots get a real label (0), so that no example's loss is 0 / 0 (NaN gradients)
    labels_N = jnp.where(valid_N.reshape(-1, *[1] * (labels_N.ndim - 1)), labels_N, 0)
    per_example_N = jax.vmap(lambda logits_C, label: losses.sequence_classification_loss(
        logits_C[None], label[None], problem_type))(logits_NC, labels_N)
    return jnp.sum(jnp.where(valid_N, per_example_N, 0.0)) / jnp.sum(valid_N)
