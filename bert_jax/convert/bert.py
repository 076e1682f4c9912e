"""Mapping table for BERT and Megatron-BERT, and the HF key variants we accept on load.

HF keys here are those of the task models (`bert.` prefix for the encoder); a bare
`BertModel` has no prefix, which `canonical_state_dict` / `hf_key_for_save` handle.
"""

from __future__ import annotations

import numpy as np

from bert_jax.convert.mapping import BIAS, Rule, linear
from bert_jax.modeling.config import BertConfig

ENCODER_PREFIX = "bert."
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
_BUFFERS = ("position_ids", "token_type_ids")  # non-persistent in current transformers
_MLM_BIAS, _DECODER_BIAS = "cls.predictions.bias", "cls.predictions.decoder.bias"

_NORMS = {  # norm param name -> HF module, per norm placement
    "post": {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
    "pre": {"attention_norm": "attention.ln", "mlp_norm": "ln"},
}


def _dense(hf: str, path: tuple[str, ...], in_axes: int = 1) -> list[Rule]:
    return [Rule(f"{hf}.weight", path + ("kernel",), linear(in_axes)),
            Rule(f"{hf}.bias", path + ("bias",), BIAS)]


def _norm(hf: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{hf}.weight", path + ("scale",)), Rule(f"{hf}.bias", path + ("bias",))]


def rules(config: BertConfig) -> list[Rule]:
    """One rule per parameter of the task model that `config.architectures` names, in the
    order of transformers' state dict (so shards split where transformers splits them)."""
    head = config.head
    pooled = head in ("Model", "ForPreTraining", "ForNextSentencePrediction",
                      "ForSequenceClassification", "ForMultipleChoice")
    enc, e = ("bert",), ENCODER_PREFIX
    pre_norm = config.norm_placement == "pre"
    table = [
        Rule(f"{e}embeddings.{name}.weight", enc + ("embeddings", name, "embedding"))
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    if not pre_norm:
        table += _norm(f"{e}embeddings.LayerNorm", enc + ("embeddings", "norm"))
    for i in range(config.num_hidden_layers):
        hf, layer = f"{e}encoder.layer.{i}.", enc + (f"layer_{i}",)
        norm = {name: _norm(hf + module, layer + (name,))
                for name, module in _NORMS[config.norm_placement].items()}
        table += norm["attention_norm"] if pre_norm else []
        for name in ("query", "key", "value"):
            table += _dense(f"{hf}attention.self.{name}", layer + ("attention", name))
        table += _dense(f"{hf}attention.output.dense", layer + ("attention", "out"), in_axes=2)
        table += norm["mlp_norm"] if pre_norm else norm["attention_norm"]
        table += _dense(f"{hf}intermediate.dense", layer + ("mlp_in",))
        table += _dense(f"{hf}output.dense", layer + ("mlp_out",))
        table += [] if pre_norm else norm["mlp_norm"]
    if pre_norm:
        table += _norm(f"{e}encoder.ln", enc + ("final_norm",))
    if pooled:
        table += _dense(f"{e}pooler.dense", enc + ("pooler", "dense"))

    if head in ("ForPreTraining", "ForMaskedLM"):
        if config.tie_word_embeddings:
            table.append(Rule(_MLM_BIAS, ("mlm", "bias")))
        else:  # transformers then keeps decoder.bias as the parameter the forward uses
            table.append(Rule(_DECODER_BIAS, ("mlm", "bias")))
        table += _dense("cls.predictions.transform.dense", ("mlm", "transform"))
        table += _norm("cls.predictions.transform.LayerNorm", ("mlm", "transform_norm"))
        if not config.tie_word_embeddings:
            table.append(Rule("cls.predictions.decoder.weight", ("mlm", "decoder", "kernel"),
                              linear()))
    if head in ("ForPreTraining", "ForNextSentencePrediction"):
        table += _dense("cls.seq_relationship", ("nsp", "dense"))
    if head in ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice"):
        table += _dense("classifier", ("classifier", "dense"))
    if head == "ForQuestionAnswering":
        table += _dense("qa_outputs", ("qa_outputs", "dense"))
    return table


def canonical_state_dict(state_dict: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Keys as `rules` names them, whatever variant the file uses.

    Accepts legacy `LayerNorm.gamma/beta`, base-model files without the `bert.` prefix,
    stray buffers, and either of `cls.predictions.bias` / `.decoder.bias` as the only copy
    of the MLM bias.
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        if key.endswith("LayerNorm.gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            key = key[: -len("beta")] + "bias"
        if not key.startswith(ENCODER_PREFIX) and not key.startswith(HEAD_PREFIXES):
            key = ENCODER_PREFIX + key
        out[key] = tensor
    for key, alias in ((_MLM_BIAS, _DECODER_BIAS), (_DECODER_BIAS, _MLM_BIAS)):
        if key not in out and alias in out:
            out[key] = out[alias]
    return out


def ignorable_keys(config: BertConfig) -> set[str]:
    """Keys a file may carry that this model does not read, without a warning: the aliases."""
    if config.tie_word_embeddings:
        return {_DECODER_BIAS, "cls.predictions.decoder.weight"}
    return {_MLM_BIAS}


def tied_weights(config: BertConfig, stored: set[str]) -> dict[str, str]:
    """HF keys the model reads from another tensor, {key: source}: the MLM decoder is the word
    embedding matrix unless `tie_word_embeddings` is false (whatever keys are `stored`)."""
    if config.tie_word_embeddings and config.head in ("ForPreTraining", "ForMaskedLM"):
        return {"cls.predictions.decoder.weight":
                ENCODER_PREFIX + "embeddings.word_embeddings.weight"}
    return {}


def hf_keys_for_save(config: BertConfig, key: str) -> tuple[str, ...]:
    """The keys transformers saves a tensor under: a bare `BertModel` has no `bert.` prefix;
    an untied MLM head stores its bias as both `cls.predictions.bias` and `.decoder.bias`."""
    if config.head == "Model":
        return (key.removeprefix(ENCODER_PREFIX),)
    if key == _DECODER_BIAS:
        return (_MLM_BIAS, _DECODER_BIAS)
    return (key,)


def may_be_newly_initialised(key: str) -> bool:
    """Head and pooler weights may be absent (e.g. a classifier from a pretrained encoder)."""
    return key.startswith(HEAD_PREFIXES) or key.startswith(ENCODER_PREFIX + "pooler.")
