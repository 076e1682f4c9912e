"""BERT and Megatron-BERT encoders and every task model of `transformers`.

One implementation; `config.norm_placement` switches between BERT (post-LN: embedding LN,
LN after each residual add) and Megatron-BERT (pre-LN: no embedding LN, LN before attention
and MLP, a final LN on the encoder output).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bert_jax.modeling import losses
from bert_jax.modeling.attention import AttentionMask, attend
from bert_jax.modeling.config import BertConfig
from bert_jax.modeling.heads import (
    Classifier,
    MaskedLMHead,
    Pooler,
    at_positions,
    labels_at,
    real_vocab,
)
from bert_jax.modeling.layers import (
    activation,
    constrain_hidden,
    dense,
    embed,
    layer_norm,
    remat_layer,
)
from bert_jax.modeling.outputs import (
    BaseModelOutput,
    LogitsOutput,
    PreTrainingOutput,
    QuestionAnsweringOutput,
)
from bert_jax.modeling.scan import LAYERS, scan_layers
from bert_jax.modeling.task_models import TaskModel


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BT, token_type_ids_BT, position_ids_BT, deterministic):
        c = self.config
        kw = dict(std=c.initializer_range, dtype=jnp.float32, param_dtype=c.param_dtype)
        x_BTD = (embed(c.padded_vocab_size, c.hidden_size, ("vocab", "embed"),
                       name="word_embeddings", **kw)(input_ids_BT)
                 + embed(c.type_vocab_size, c.hidden_size, ("token_types", "embed"),
                         name="token_type_embeddings", **kw)(token_type_ids_BT)
                 + embed(c.max_position_embeddings, c.hidden_size, ("positions", "embed"),
                         name="position_embeddings", **kw)(position_ids_BT))
        if c.norm_placement == "post":
            x_BTD = layer_norm(c.layer_norm_eps, param_dtype=c.param_dtype, name="norm")(x_BTD)
        x_BTD = nn.Dropout(c.hidden_dropout_prob)(x_BTD, deterministic=deterministic)
        return x_BTD.astype(c.dtype)


class SelfAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections, through the attention core."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BTD, mask: AttentionMask, deterministic):
        c = self.config
        heads = (c.num_attention_heads, c.head_dim)
        kw = dict(std=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype)
        q_BTNH = dense(heads, ("embed", "heads", "kv"), name="query", **kw)(x_BTD)
        k_BTNH = dense(heads, ("embed", "heads", "kv"), name="key", **kw)(x_BTD)
        v_BTNH = dense(heads, ("embed", "heads", "kv"), name="value", **kw)(x_BTD)
        dropout_rng = None
        if not deterministic and c.attention_probs_dropout_prob > 0:
            dropout_rng = self.make_rng("dropout")
        o_BTNH = attend(q_BTNH, k_BTNH, v_BTNH, mask, backend=c.attention_backend,
                        dropout_rate=c.attention_probs_dropout_prob, dropout_rng=dropout_rng,
                        dropout_field=c.ATTENTION_DROPOUT_FIELD)
        return dense(c.hidden_size, ("heads", "kv", "embed"), in_axes=(-2, -1), name="out",
                     **kw)(o_BTNH)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BTD, mask: AttentionMask, deterministic):
        c = self.config
        norm_kw = dict(param_dtype=c.param_dtype)
        dense_kw = dict(std=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype)
        dropout = nn.Dropout(c.hidden_dropout_prob)
        attention_norm = layer_norm(c.layer_norm_eps, name="attention_norm", **norm_kw)
        mlp_norm = layer_norm(c.layer_norm_eps, name="mlp_norm", **norm_kw)
        attention = SelfAttention(c, name="attention")

        def mlp(h):
            h = dense(c.intermediate_size, ("embed", "mlp"), name="mlp_in", **dense_kw)(h)
            h = activation(c.hidden_act)(h)
            return dense(c.hidden_size, ("mlp", "embed"), name="mlp_out", **dense_kw)(h)

        if c.norm_placement == "post":
            x = attention_norm(x_BTD + dropout(attention(x_BTD, mask, deterministic),
                                               deterministic))
            x = mlp_norm(x + dropout(mlp(x.astype(c.dtype)), deterministic))
        else:
            x = x_BTD + dropout(attention(attention_norm(x_BTD).astype(c.dtype), mask,
                                          deterministic), deterministic)
            x = x + dropout(mlp(mlp_norm(x).astype(c.dtype)), deterministic)
        return x.astype(c.dtype)


class BertModel(nn.Module):
    """Embeddings, the layer stack and (optionally) the pooler: HF `BertModel`.

    Packed rows (`data.packing`) also give `segment_ids` (tokens see their own segment only)
    and, for the pooler, `cls_positions` `[B, P]` (then `pooler_output` is `[B, P, D]`).
    """

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 segment_ids=None, cls_positions=None) -> BaseModelOutput:
        """Inputs are [B, T] integer arrays, named as in `transformers`."""
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        mask = AttentionMask(key_padding_BS=attention_mask, query_segment_ids_BT=segment_ids,
                             key_segment_ids_BS=segment_ids)

        x_BTD = constrain_hidden(Embeddings(c, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic))
        hidden_states = [x_BTD]
        layer_cls = remat_layer(Layer, c.remat, static_argnums=(3,),  # deterministic
                                scanned=c.scan_layers)
        if c.scan_layers:
            def step(layer, x_BTD, mask):
                x_BTD = constrain_hidden(layer(x_BTD, mask, deterministic))
                return x_BTD, x_BTD if output_hidden_states else None

            x_BTD, x_LBTD = scan_layers(step, layer_cls(c, name=LAYERS), x_BTD, mask,
                                        length=c.num_hidden_layers)
            if output_hidden_states:
                hidden_states += list(x_LBTD)
        else:
            for i in range(c.num_hidden_layers):
                x_BTD = constrain_hidden(layer_cls(c, name=f"layer_{i}")(x_BTD, mask,
                                                                         deterministic))
                hidden_states.append(x_BTD)
        if c.norm_placement == "pre":
            x_BTD = layer_norm(c.layer_norm_eps, param_dtype=c.param_dtype,
                               name="final_norm")(x_BTD).astype(c.dtype)
            hidden_states[-1] = x_BTD
        pooled_BD = (Pooler(c, name="pooler")(x_BTD, cls_positions) if self.add_pooling_layer
                     else None)
        return BaseModelOutput(
            last_hidden_state=x_BTD,
            pooler_output=pooled_BD,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class BertTaskModel(TaskModel):
    """What BERT's task models do their own way: `BertModel` under `bert`, whose pooler over
    [CLS] is the sequence vector; dropout then one dense layer as classifiers; a masked-LM
    head tied to the word embeddings."""

    config: BertConfig

    def encode(self, inputs, deterministic, output_hidden_states, *, pooled=False,
               segment_ids=None, cls_positions=None) -> BaseModelOutput:
        return BertModel(self.config, add_pooling_layer=pooled, name="bert")(
            *inputs, deterministic, output_hidden_states, segment_ids, cls_positions)

    def sequence_vector(self, out, cls_positions_BP):
        return out.pooler_output

    def classify(self, x, num_outputs, deterministic):
        c = self.config
        return Classifier(c, num_outputs, c.classifier_dropout_prob, name="classifier")(
            x, deterministic)

    def span_logits(self, x_BTD, deterministic):
        return Classifier(self.config, 2, name="qa_outputs")(x_BTD, deterministic)

    def mlm(self, x_BTD, labels_BT, masked_positions_BP, deterministic, count=None):
        logits, labels = self.masked_lm_logits(x_BTD, labels_BT, masked_positions_BP)
        out_logits = real_vocab(logits, self.config.vocab_size)
        if labels is None:
            return out_logits, None, None
        return (out_logits, losses.cross_entropy(logits, labels, count=count),
                losses.labelled(labels))

    def masked_lm_logits(self, x_BTD, labels_BT, masked_positions_BP):
        """MLM logits and the labels they answer: everywhere, or at `masked_positions_BP`.
        The logits span the padded vocabulary (padding masked): losses are computed on them,
        outputs cut to the real one (`heads.real_vocab`)."""
        if masked_positions_BP is not None:
            x_BTD = at_positions(x_BTD, masked_positions_BP)
            labels_BT = None if labels_BT is None else labels_at(labels_BT, masked_positions_BP)
        embedding_VD = nn.meta.unbox(  # the encoder's, for the tied decoder
            self.variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"])
        return MaskedLMHead(self.config, name="mlm")(x_BTD, embedding_VD), labels_BT

    def nsp(self, pooled_BD, deterministic):
        return Classifier(self.config, 2, name="nsp")(pooled_BD, deterministic)


class BertForBaseModel(BertTaskModel):
    """HF `BertModel` under the `bert` name, so every task model shares the encoder subtree."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic=True, output_hidden_states=False) -> BaseModelOutput:
        return self.base_model((input_ids, attention_mask, token_type_ids, position_ids),
                               deterministic, output_hidden_states)


class BertForPreTraining(BertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, next_sentence_label=None, masked_positions=None,
                 deterministic=True, output_hidden_states=False,
                 loss_counts=None) -> PreTrainingOutput:
        """`masked_positions` as in `BertForMaskedLM`; `loss_counts`: a larger batch's
        {"mlm": masked-LM labels, "nsp": NSP labels}, which the two losses divide by
        (gradient accumulation), instead of this batch's own (returned as `loss_counts`)."""
        out = self.encode((input_ids, attention_mask, token_type_ids, position_ids),
                          deterministic, output_hidden_states, pooled=True)
        mlm_logits, labels = self.masked_lm_logits(out.last_hidden_state, labels,
                                                   masked_positions)
        nsp_logits = self.nsp(out.pooler_output, deterministic)
        loss = counts = None
        if labels is not None and next_sentence_label is not None:
            counts = {"mlm": losses.labelled(labels), "nsp": losses.labelled(next_sentence_label)}
            divide_by = counts if loss_counts is None else loss_counts
            loss = (losses.cross_entropy(mlm_logits, labels, count=divide_by["mlm"])
                    + losses.cross_entropy(nsp_logits, next_sentence_label,
                                           count=divide_by["nsp"]))
        return PreTrainingOutput(real_vocab(mlm_logits, self.config.vocab_size), nsp_logits,
                                 loss, out.hidden_states, counts)


class BertForMaskedLM(BertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, masked_positions=None, deterministic=True,
                 output_hidden_states=False, loss_counts=None) -> LogitsOutput:
        """`masked_positions` ([B, P], -1 in empty slots; e.g. from the pretraining pipeline)
        computes the logits `[B, P, V]` at those positions only, and the loss over the labels
        there: the same loss when they hold every labelled position, for a fraction of the
        head's cost (the vocabulary projection is a fifth of BERT-base's FLOPs).
        `loss_counts` as in `BertForPreTraining`."""
        return self.masked_lm((input_ids, attention_mask, token_type_ids, position_ids), labels,
                              masked_positions, deterministic, output_hidden_states, loss_counts)


class BertForNextSentencePrediction(BertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, deterministic=True, output_hidden_states=False) -> LogitsOutput:
        out = self.encode((input_ids, attention_mask, token_type_ids, position_ids),
                          deterministic, output_hidden_states, pooled=True)
        logits = self.nsp(out.pooler_output, deterministic)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return LogitsOutput(logits, loss, out.hidden_states)


class BertForSequenceClassification(BertTaskModel):
    """Classifies the pooled [CLS] vector (of each segment on packed rows)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, deterministic=True, output_hidden_states=False, segment_ids=None,
                 cls_positions=None) -> LogitsOutput:
        return self.sequence_classification(
            (input_ids, attention_mask, token_type_ids, position_ids), labels, deterministic,
            output_hidden_states, segment_ids, cls_positions)


class BertForTokenClassification(BertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, deterministic=True, output_hidden_states=False,
                 segment_ids=None) -> LogitsOutput:
        return self.token_classification(
            (input_ids, attention_mask, token_type_ids, position_ids), labels, deterministic,
            output_hidden_states, segment_ids)


class BertForQuestionAnswering(BertTaskModel):
    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 start_positions=None, end_positions=None, deterministic=True,
                 output_hidden_states=False) -> QuestionAnsweringOutput:
        return self.question_answering(
            (input_ids, attention_mask, token_type_ids, position_ids), start_positions,
            end_positions, deterministic, output_hidden_states)


class BertForMultipleChoice(BertTaskModel):
    """Each choice is scored from its pooled [CLS] vector."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 labels=None, deterministic=True, output_hidden_states=False) -> LogitsOutput:
        return self.multiple_choice((input_ids, attention_mask, token_type_ids, position_ids),
                                    labels, deterministic, output_hidden_states)


TASK_MODELS = {
    "Model": BertForBaseModel,
    "ForPreTraining": BertForPreTraining,
    "ForMaskedLM": BertForMaskedLM,
    "ForNextSentencePrediction": BertForNextSentencePrediction,
    "ForSequenceClassification": BertForSequenceClassification,
    "ForTokenClassification": BertForTokenClassification,
    "ForQuestionAnswering": BertForQuestionAnswering,
    "ForMultipleChoice": BertForMultipleChoice,
}

