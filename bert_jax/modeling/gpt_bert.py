"""GPT-BERT (NorBERT 4): one network that is a bidirectional masked LM and a causal LM.

Implements the released NorBERT 4 architecture ("Version A" of ARCHITECTURES.md section 1):
parameter-free LayerNorms with `(1 + scale)` input scales on every linear, QK-norm, RoPE
(theta per layer), local/global sliding windows, a value residual from the first layer, six
mixing lambdas per layer, and GeGLU with tanh GELU. Attention goes through the shared core.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.errors import BertJaxError
from bert_jax.modeling import losses
from bert_jax.modeling.attention import AttentionMask, attend
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.modeling.heads import at_cls, mask_padded_vocab, real_vocab
from bert_jax.modeling.layers import constrain_hidden, remat_layer
from bert_jax.modeling.outputs import BaseModelOutput, LogitsOutput, QuestionAnsweringOutput
from bert_jax.modeling.scan import LAYERS, scan_layers
from bert_jax.modeling.task_models import TaskModel


def norm(x, eps: float, axes: int | tuple[int, ...] = -1):
    """LayerNorm without parameters, in fp32 (biased variance, as PyTorch), cast back."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _init_std(config: GptBertConfig) -> float:
    return (2.0 / (5.0 * config.hidden_size)) ** 0.5


class ScaledLinear(nn.Module):
    """NorBERT's CastedLinearIn: `x @ (W * (1 + scale))`, the scale on the input features.

    Several kernels may share one input and one scale (`kernels=("query", "key")` for the
    fused q/k projection); the call returns one output per kernel then.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    config: GptBertConfig
    kernels: Sequence[str] = ("kernel",)
    in_dims: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        in_shape = x.shape[-self.in_dims:]
        in_axes = self.kernel_axes[: self.in_dims]
        scale_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), in_axes)
        scale = self.param("scale", scale_init, in_shape, c.param_dtype)
        multiplier = (1.0 + scale.astype(jnp.float32)).reshape(in_shape + (1,) * len(self.features))
        init = nn.with_logical_partitioning(
            nn.initializers.truncated_normal(_init_std(c)), self.kernel_axes)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        outputs = []
        for name in self.kernels:
            kernel = self.param(name, init, in_shape + tuple(self.features), c.param_dtype)
            kernel = (kernel.astype(jnp.float32) * multiplier).astype(c.dtype)
            outputs.append(jax.lax.dot_general(x.astype(c.dtype), kernel, (contract, ((), ()))))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), self.kernel_axes[self.in_dims:]), self.features,
                c.param_dtype)
            outputs = [y + bias.astype(c.dtype) for y in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def rope(x_BTNH, positions_BT, theta: float):
    """Rotate-half rotary embedding at absolute `positions`, computed in fp32."""
    half = x_BTNH.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x_BTNH.shape[-1])
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(jnp.concatenate([angle_BTh, angle_BTh], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angle_BTh, angle_BTh], -1))[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)


class SelfAttention(nn.Module):
    config: GptBertConfig
    layer: int

    @nn.compact
    def __call__(self, value_in_BTD, qk_in_BTD, first_value_BTNH, positions_BT,
                 mask: AttentionMask, deterministic: bool, cache: dict | None = None,
                 is_first=None):
        """Returns the attention output, the first layer's values (for the value residual)
        and the updated cache (when decoding with one). `mask` is the model's (padding,
        segments, causal); this layer adds its window.

        first_value_BTNH: None in the first layer when unrolled. Scanned layers get an array
            and `is_first`, a traced bool saying whether this is the first layer after all.
        """
        c, eps = self.config, self.config.layer_norm_eps
        n, dqk, dv = c.num_attention_heads, c.query_key_head_size, c.value_head_size
        qk_proj = ScaledLinear((n, dqk), ("embed", "heads", "kv"), c, kernels=("query", "key"),
                               name="qk_proj")
        q_BTNH, k_BTNH = qk_proj(norm(qk_in_BTD, eps))
        v_BTNH = ScaledLinear((n, dv), ("embed", "heads", "kv"), c, name="v_proj")(
            norm(value_in_BTD, eps))
        scale_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv"))
        q_scale = self.param("q_scale", scale_init, (n, dqk), c.param_dtype)
        k_scale = self.param("k_scale", scale_init, (n, dqk), c.param_dtype)
        q_BTNH = (norm(q_BTNH, eps) * (1.0 + q_scale)).astype(c.dtype)
        k_BTNH = (norm(k_BTNH, eps) * (1.0 + k_scale)).astype(c.dtype)
        alpha = self.param("lambdas", nn.with_logical_partitioning(
            nn.initializers.constant(0.5), ("lambdas",)), (1,), c.param_dtype)
        if first_value_BTNH is None:
            first_value_BTNH = v_BTNH
        else:
            mixed_BTNH = ((1.0 - alpha) * v_BTNH + alpha * first_value_BTNH).astype(c.dtype)
            if is_first is not None:
                first_value_BTNH = jnp.where(is_first, v_BTNH, first_value_BTNH)
                mixed_BTNH = jnp.where(is_first, v_BTNH, mixed_BTNH)
            v_BTNH = mixed_BTNH
        theta = c.rope_theta(self.layer)
        q_BTNH, k_BTNH = rope(q_BTNH, positions_BT, theta), rope(k_BTNH, positions_BT, theta)

        window = c.window(self.layer)
        mask = mask.replace(window=(window, 0 if mask.causal else window))
        if cache is not None:  # keys: the cached ones, then the new ones; masks by position
            k_BTNH, v_BTNH, mask, cache = _with_cache(cache, k_BTNH, v_BTNH, positions_BT, mask)
        dropout_rng = None
        if not deterministic and c.attention_dropout > 0:
            dropout_rng = self.make_rng("dropout")
        o_BTNH = attend(q_BTNH, k_BTNH, v_BTNH, mask, backend=c.attention_backend,
                        dropout_rate=c.attention_dropout, dropout_rng=dropout_rng,
                        dropout_field=c.ATTENTION_DROPOUT_FIELD)
        out_BTD = ScaledLinear((c.hidden_size,), ("heads", "kv", "embed"), c, in_dims=2,
                               name="out_proj")(norm(o_BTNH, eps, axes=(-2, -1)))
        out_BTD = nn.Dropout(c.hidden_dropout)(out_BTD, deterministic=deterministic)
        return out_BTD, first_value_BTNH, cache


def init_cache(config: GptBertConfig, batch: int, max_length: int) -> dict:
    """An empty decoding cache: per layer a ring buffer of the last `window` keys and values
    (with their positions), so memory stays bounded by the window, not the output length."""
    layers = []
    for i in range(config.num_layers):
        slots = min(config.window(i), max_length)
        layers.append({
            "k": jnp.zeros((batch, slots, config.num_attention_heads, config.query_key_head_size),
                           config.dtype),
            "v": jnp.zeros((batch, slots, config.num_attention_heads, config.value_head_size),
                           config.dtype),
            "positions": jnp.zeros((batch, slots), jnp.int32),
            "valid": jnp.zeros((batch, slots), bool),
        })
    return {"length": jnp.zeros((), jnp.int32), "layers": tuple(layers)}


def _with_cache(cache, k_BTNH, v_BTNH, positions_BT, mask: AttentionMask):
    """Attend over cache + new keys; write the newest `slots` tokens into the ring buffer.

    Slots are assigned by stream index (`length` counts every token fed, padding too), so
    the buffer always holds the most recent tokens of every row of a left-padded batch.
    """
    layer, length = cache["layer"], cache["length"]
    keys = jnp.concatenate([layer["k"], k_BTNH], axis=1)
    values = jnp.concatenate([layer["v"], v_BTNH], axis=1)
    key_positions = jnp.concatenate([layer["positions"], positions_BT.astype(jnp.int32)], axis=1)
    valid = jnp.concatenate([layer["valid"], mask.key_padding_BS.astype(bool)], axis=1)
    mask = AttentionMask(key_padding_BS=valid, causal=True, window=mask.window,
                         query_positions_BT=positions_BT, key_positions_BS=key_positions)
    slots, new = layer["k"].shape[1], k_BTNH.shape[1]
    keep = min(new, slots)
    index = (length + new - keep + jnp.arange(keep)) % slots
    updated = {
        "k": layer["k"].at[:, index].set(k_BTNH[:, new - keep:]),
        "v": layer["v"].at[:, index].set(v_BTNH[:, new - keep:]),
        "positions": layer["positions"].at[:, index].set(key_positions[:, -keep:]),
        "valid": layer["valid"].at[:, index].set(valid[:, -keep:]),
    }
    return keys, values, mask, updated


class FeedForward(nn.Module):
    """GeGLU: the first half of up_proj is the linear part, the second the tanh-GELU gate."""

    config: GptBertConfig

    @nn.compact
    def __call__(self, x_BTD, deterministic: bool):
        c, eps = self.config, self.config.layer_norm_eps
        linear, gate = ScaledLinear((c.intermediate_size,), ("embed", "mlp"), c,
                                    kernels=("linear", "gate"), name="up_proj")(norm(x_BTD, eps))
        h = norm(linear * gelu_tanh(gate), eps)
        out = ScaledLinear((c.hidden_size,), ("mlp", "embed"), c, name="down_proj")(h)
        return nn.Dropout(c.hidden_dropout)(out, deterministic=deterministic)


class Layer(nn.Module):
    config: GptBertConfig
    layer: int

    @nn.compact
    def __call__(self, h_BTD, emb_BTD, first_value, positions_BT, mask, deterministic,
                 cache=None, is_first=None):
        """`is_first`: see `SelfAttention`."""
        c = self.config
        lam = self.param("lambdas", nn.with_logical_partitioning(
            lambda key, shape, dtype: jnp.array([0, 0, 1, 0, 1, 0], dtype), ("lambdas",)),
            (6,), c.param_dtype).astype(jnp.float32)

        def mix(weight):
            return ((1.0 - weight) * h_BTD + weight * emb_BTD).astype(c.dtype)

        attn_BTD, first_value, cache = SelfAttention(c, self.layer, name="attention")(
            mix(lam[0]), mix(lam[1]), first_value, positions_BT, mask, deterministic, cache,
            is_first)
        mlp_in = jax.nn.softplus(lam[2]) * mix(lam[3]) + attn_BTD
        mlp_out = FeedForward(c, name="mlp")(mlp_in.astype(c.dtype), deterministic)
        h_BTD = jax.nn.softplus(lam[4]) * mix(lam[5]) + attn_BTD + mlp_out
        return h_BTD.astype(c.dtype), first_value, cache


class LayerGroup(nn.Module):
    """One step of the scanned layer stack: `layers_per_scan_step` consecutive layers, the
    local ones and the global one after them, as `layer_0` .. (their windows and RoPE thetas
    are those of the model's first group). The value-residual source is a run-time flag."""

    config: GptBertConfig

    @nn.compact
    def __call__(self, h_BTD, emb_BTD, first_value_BTNH, is_first, positions_BT, mask,
                 deterministic):
        """Returns the new residual stream, the value-residual source and the group's layer
        outputs stacked `[layers_per_scan_step, B, T, D]`."""
        c = self.config
        layer_cls = remat_layer(Layer, c.remat, static_argnums=(6,), scanned=True)
        outputs = []
        for j in range(c.layers_per_scan_step):
            h_BTD, first_value_BTNH, _ = layer_cls(c, j, name=f"layer_{j}")(
                h_BTD, emb_BTD, first_value_BTNH, positions_BT, mask, deterministic, None,
                is_first if j == 0 else None)
            h_BTD = constrain_hidden(h_BTD)
            outputs.append(h_BTD)
        return h_BTD, first_value_BTNH, jnp.stack(outputs)


class GptBertModel(nn.Module):
    """Embedding and the layer stack; `last_hidden_state` is the raw residual stream.

    With `past_key_values` (from `init_cache`) the inputs continue the cached tokens (causal
    decoding), `position_ids` are required, and the updated cache is returned. Packed
    pretraining rows give `segment_ids` (tokens see their own document only) and
    `causal_rows` (which rows are causal, whatever the config says).
    """

    config: GptBertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True,
                 output_hidden_states=False, past_key_values=None, segment_ids=None,
                 causal_rows=None) -> BaseModelOutput:
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        embedding = nn.Embed(c.padded_vocab_size, c.hidden_size, dtype=jnp.float32,
                             param_dtype=c.param_dtype, name="word_embedding",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.truncated_normal(_init_std(c)),
                                 ("vocab", "embed")))
        word_scale = self.param("word_scale", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)), (c.hidden_size,), c.param_dtype)
        emb_BTD = norm(embedding(input_ids), c.layer_norm_eps) * (1.0 + word_scale)
        emb_BTD = nn.Dropout(c.embedding_dropout)(emb_BTD, deterministic=deterministic)
        emb_BTD = constrain_hidden(emb_BTD.astype(c.dtype))

        mask = AttentionMask(key_padding_BS=attention_mask, query_segment_ids_BT=segment_ids,
                             key_segment_ids_BS=segment_ids, causal_rows_B=causal_rows,
                             causal=c.is_causal and causal_rows is None)
        if c.scan_layers:
            if past_key_values is not None:
                raise BertJaxError("decoding with past_key_values needs the unrolled layers: "
                                   "load the model with scan_layers=false")
            h_BTD, hidden_LBTD = self._scanned_layers(emb_BTD, position_ids, mask, deterministic,
                                                      output_hidden_states)
            return BaseModelOutput(last_hidden_state=h_BTD, hidden_states=(
                (emb_BTD, *hidden_LBTD) if output_hidden_states else None))
        h_BTD, first_value, hidden_states, caches = emb_BTD, None, [emb_BTD], []
        layer_cls = remat_layer(Layer, c.remat, static_argnums=(6,))  # deterministic
        for i in range(c.num_layers):
            cache = None
            if past_key_values is not None:
                cache = {"layer": past_key_values["layers"][i], "length": past_key_values["length"]}
            h_BTD, first_value, cache = layer_cls(c, i, name=f"layer_{i}")(
                h_BTD, emb_BTD, first_value, position_ids, mask, deterministic, cache)
            h_BTD = constrain_hidden(h_BTD)
            hidden_states.append(h_BTD)
            caches.append(cache)
        new_cache = None
        if past_key_values is not None:
            new_cache = {"length": past_key_values["length"] + input_ids.shape[1],
                         "layers": tuple(caches)}
        return BaseModelOutput(last_hidden_state=h_BTD,
                               hidden_states=tuple(hidden_states) if output_hidden_states else None,
                               past_key_values=new_cache)

    def _scanned_layers(self, emb_BTD, positions_BT, mask, deterministic, output_hidden_states):
        """The layer stack as one `nn.scan` over `LayerGroup`s: (last hidden state, every
        layer's output `[L, B, T, D]` if `output_hidden_states`, else None)."""
        c = self.config
        b, t = emb_BTD.shape[:2]
        first_value_BTNH = jnp.zeros((b, t, c.num_attention_heads, c.value_head_size), c.dtype)

        def step(group, carry, emb_BTD, positions_BT, mask):
            h_BTD, first_value_BTNH, index = carry
            h_BTD, first_value_BTNH, outputs_GBTD = group(
                h_BTD, emb_BTD, first_value_BTNH, index == 0, positions_BT, mask, deterministic)
            return (h_BTD, first_value_BTNH, index + 1), (outputs_GBTD if output_hidden_states
                                                          else None)

        (h_BTD, _, _), outputs_SGBTD = scan_layers(
            step, LayerGroup(c, name=LAYERS), (emb_BTD, first_value_BTNH, jnp.int32(0)),
            emb_BTD, positions_BT, mask, length=c.num_layers // c.layers_per_scan_step)
        if not output_hidden_states:
            return h_BTD, None
        return h_BTD, outputs_SGBTD.reshape((c.num_layers,) + outputs_SGBTD.shape[2:])


class Classifier(nn.Module):
    """LN -> projection -> tanh GELU -> LN (-> dropout) -> output layer with a bias."""

    config: GptBertConfig
    num_outputs: int
    output_name: str
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c, eps = self.config, self.config.layer_norm_eps
        x = ScaledLinear((c.hidden_size,), ("embed", "mlp"), c, name="projection")(norm(x, eps))
        x = norm(gelu_tanh(x), eps)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        axes = ("embed", "vocab" if self.output_name == "emb2vocab" else "classes")
        logits = ScaledLinear((self.num_outputs,), axes, c, use_bias=True,
                              name=self.output_name)(x)
        return logits.astype(jnp.float32)


def bounded(logits):
    """The LM heads' `30 * sigmoid(x / 7.5)`: logits in (0, 30), in training too."""
    return 30.0 * jax.nn.sigmoid(logits / 7.5)


def next_token_loss(logits_BTV, labels_BT, count=None):
    """Position t predicts the label at t + 1 (labels are given aligned with the inputs);
    `count` as in `losses.cross_entropy`."""
    return losses.cross_entropy(logits_BTV[:, :-1], labels_BT[:, 1:], count=count)


def next_token_labels(labels_BT):
    """How many labels `next_token_loss` is over."""
    return losses.labelled(labels_BT[:, 1:])


class GptBertTaskModel(TaskModel):
    """What GPT-BERT's task models do their own way: `GptBertModel` under `model` (no token
    types, no pooler: position 0 is the sequence vector), its `Classifier` (dropout before
    the output layer), bounded next-token LM logits; LM outputs carry the last hidden state,
    as the reference's do."""

    config: GptBertConfig
    lm_last_hidden_state = True

    def encode(self, inputs, deterministic, output_hidden_states, *, pooled=False,
               segment_ids=None, cls_positions=None, past_key_values=None,
               causal_rows=None) -> BaseModelOutput:
        """`pooled` and `cls_positions` concern `sequence_vector` only; decoding gives
        `past_key_values`, the pretraining objective `causal_rows`."""
        return GptBertModel(self.config, name="model")(
            *inputs, deterministic, output_hidden_states, past_key_values, segment_ids,
            causal_rows)

    def sequence_vector(self, out, cls_positions_BP):
        return at_cls(out.last_hidden_state, cls_positions_BP)

    def classify(self, x, num_outputs, deterministic):
        c = self.config
        return Classifier(c, num_outputs, "output_projection", c.classifier_dropout or 0.0,
                          name="classifier")(x, deterministic)

    def span_logits(self, x_BTD, deterministic):
        """Output 0 is the start logit, output 1 the end logit."""
        return self.classify(x_BTD, self.config.num_labels, deterministic)

    def mlm(self, x_BTD, labels_BT, masked_positions_BP, deterministic, count=None):
        """The next-token loss; the logits shifted right by one (`_predicting_own_position`).
        Never `masked_positions_BP`: its masked LM does not take them."""
        z_BTV = self.lm_logits(x_BTD, deterministic)
        logits = _predicting_own_position(z_BTV, self.config)
        if labels_BT is None:
            return logits, None, None
        return logits, next_token_loss(z_BTV, labels_BT, count), next_token_labels(labels_BT)

    def lm_logits(self, h_BTD, deterministic: bool):
        """The LM heads' bounded vocabulary logits of every position (unshifted), over the
        padded vocabulary with the padding masked (`heads.mask_padded_vocab`): the losses
        are computed on these, the outputs cut to the real vocabulary."""
        c = self.config
        return mask_padded_vocab(bounded(Classifier(c, c.padded_vocab_size, "emb2vocab",
                                                    name="classifier")(h_BTD, deterministic)),
                                 c.vocab_size)


class GptBertForBaseModel(GptBertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True,
                 output_hidden_states=False) -> BaseModelOutput:
        return self.base_model((input_ids, attention_mask, position_ids), deterministic,
                               output_hidden_states)


class GptBertForMaskedLM(GptBertTaskModel):
    """Bidirectional; logits returned shifted right by one (the BOS one-hot at position 0),
    so `logits[:, i]` predicts the token at position i, as the reference returns them."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 deterministic=True, output_hidden_states=False,
                 loss_counts=None) -> LogitsOutput:
        return self.masked_lm((input_ids, attention_mask, position_ids), labels, None,
                              deterministic, output_hidden_states, loss_counts)


class GptBertForPreTraining(GptBertTaskModel):
    """GPT-BERT's hybrid objective on packed rows (`data.pipeline.gpt_bert_pipeline`): masked
    next-token prediction on bidirectional rows, next-token prediction on `causal_rows`, one
    LM head. Each objective's loss is its token mean, weighted by its share of the rows, so
    causal rows (every token labelled) do not drown the masked ones (15% labelled). Logits
    are returned as the masked-LM head's (`logits[:, i]` predicts token i). Saved as
    `GptBertForMaskedLM`, whose parameters these are.

    `loss_counts`: a larger batch's labels and rows of each kind ({"causal", "masked",
    "causal_rows", "rows"}), which the loss is then normalised by (gradient accumulation),
    instead of this batch's own (returned as `loss_counts`)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                 causal_rows=None, labels=None, deterministic=True,
                 output_hidden_states=False, loss_counts=None) -> LogitsOutput:
        out = self.encode((input_ids, attention_mask, position_ids), deterministic,
                          output_hidden_states, segment_ids=segment_ids, causal_rows=causal_rows)
        z_BTV = self.lm_logits(out.last_hidden_state, deterministic)
        loss = counts = None
        if labels is not None:
            rows_B = jnp.zeros(labels.shape[:1], bool) if causal_rows is None else causal_rows
            causal = jnp.where(rows_B[:, None], labels, losses.IGNORE_INDEX)
            masked = jnp.where(rows_B[:, None], losses.IGNORE_INDEX, labels)
            counts = {"causal": next_token_labels(causal), "masked": next_token_labels(masked),
                      "causal_rows": jnp.sum(rows_B), "rows": jnp.asarray(rows_B.size)}
            n = counts if loss_counts is None else loss_counts
            causal_share = n["causal_rows"] / n["rows"]
            loss = (causal_share * _or_zero(next_token_loss(z_BTV, causal, n["causal"]))
                    + (1.0 - causal_share) * _or_zero(next_token_loss(z_BTV, masked, n["masked"])))
        return LogitsOutput(_predicting_own_position(z_BTV, self.config), loss,
                            out.hidden_states, out.last_hidden_state, loss_counts=counts)


def _predicting_own_position(z_BTV, config: GptBertConfig):
    """Next-token logits shifted right by one, a BOS one-hot in front: `[:, i]` predicts i;
    over the real vocabulary (`heads.real_vocab`)."""
    z_BTV = real_vocab(z_BTV, config.vocab_size)
    bos_BV = jax.nn.one_hot(jnp.full(z_BTV.shape[:1], config.bos_token_id), z_BTV.shape[-1])
    return jnp.concatenate([bos_BV[:, None], z_BTV[:, :-1]], axis=1)


def _or_zero(loss):
    """A loss over no labelled token (0 / 0) counts as 0: a batch may lack one row kind."""
    return jnp.where(jnp.isfinite(loss), loss, 0.0)


class GptBertForCausalLM(GptBertTaskModel):
    """Causal attention; standard next-token logits (not shifted). Decodes with a cache."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 deterministic=True, output_hidden_states=False,
                 past_key_values=None) -> LogitsOutput:
        out = self.encode((input_ids, attention_mask, position_ids), deterministic,
                          output_hidden_states, past_key_values=past_key_values)
        logits = self.lm_logits(out.last_hidden_state, deterministic)
        loss = None if labels is None else next_token_loss(logits, labels)
        return LogitsOutput(real_vocab(logits, self.config.vocab_size), loss, out.hidden_states,
                            out.last_hidden_state, out.past_key_values)


class GptBertForSequenceClassification(GptBertTaskModel):
    """Classifies from position 0 (the `<s>` token), or each packed segment's first token."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 deterministic=True, output_hidden_states=False, segment_ids=None,
                 cls_positions=None) -> LogitsOutput:
        return self.sequence_classification(
            (input_ids, attention_mask, position_ids), labels, deterministic,
            output_hidden_states, segment_ids, cls_positions)


class GptBertForTokenClassification(GptBertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 deterministic=True, output_hidden_states=False,
                 segment_ids=None) -> LogitsOutput:
        return self.token_classification((input_ids, attention_mask, position_ids), labels,
                                         deterministic, output_hidden_states, segment_ids)


class GptBertForQuestionAnswering(GptBertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, start_positions=None,
                 end_positions=None, deterministic=True,
                 output_hidden_states=False) -> QuestionAnsweringOutput:
        return self.question_answering((input_ids, attention_mask, position_ids),
                                       start_positions, end_positions, deterministic,
                                       output_hidden_states)


class GptBertForMultipleChoice(GptBertTaskModel):
    """Each choice scored from its position 0. (The reference applies its classifier to
    every position and reshapes, which does not give one score per choice; we pool position
    0 as sequence classification does.)"""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 deterministic=True, output_hidden_states=False) -> LogitsOutput:
        return self.multiple_choice((input_ids, attention_mask, position_ids), labels,
                                    deterministic, output_hidden_states)


TASK_MODELS = {
    "Model": GptBertForBaseModel,
    "ForMaskedLM": GptBertForMaskedLM,
    "ForCausalLM": GptBertForCausalLM,
    "ForPreTraining": GptBertForPreTraining,  # bert_jax's pretraining objective, not Hub code
    "ForSequenceClassification": GptBertForSequenceClassification,
    "ForTokenClassification": GptBertForTokenClassification,
    "ForQuestionAnswering": GptBertForQuestionAnswering,
    "ForMultipleChoice": GptBertForMultipleChoice,
}

