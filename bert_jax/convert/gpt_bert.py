"""Mapping table for GPT-BERT (NorBERT 4), keyed as the reference's own state dict.

The HPLT 3.0 GPT-BERT variant (normalised `lambdas_v/_qk/_mlp/_out`, no value residual)
shares the names otherwise; it is recognised and refused until it is implemented.
"""

from __future__ import annotations

import numpy as np

from bert_jax.convert.mapping import BIAS, Rule, linear
from bert_jax.errors import BertJaxError
from bert_jax.modeling.gpt_bert_config import GptBertConfig

LM_HEADS = ("ForMaskedLM", "ForCausalLM", "ForPreTraining")
_EMBEDDING, _OUTPUT_EMBEDDING = "embedding.word_embedding.weight", "classifier.emb2vocab.weight"


def _scaled(hf: str, path: tuple[str, ...], kernels: dict[str, str], in_axes: int = 1,
            bias: bool = False) -> list[Rule]:
    """A CastedLinearIn: its kernels (`kernels`: HF suffix -> param name), scale and bias."""
    rules = [Rule(f"{hf}.{suffix}", path + (name,), linear(in_axes))
             for suffix, name in kernels.items()]
    rules.append(Rule(f"{hf}.scale", path + ("scale",), BIAS))
    if bias:
        rules.append(Rule(f"{hf}.bias", path + ("bias",)))
    return rules


def rules(config: GptBertConfig) -> list[Rule]:
    enc = ("model",)
    table = [Rule(_EMBEDDING, enc + ("word_embedding", "embedding")),
             Rule("embedding.word_scale", enc + ("word_scale",))]
    for i in range(config.num_layers):
        hf, layer = f"encoder.layers.{i}.", enc + (f"layer_{i}",)
        attn = layer + ("attention",)
        table.append(Rule(f"{hf}lambdas", layer + ("lambdas",)))
        table += _scaled(f"{hf}attention.qk_proj", attn + ("qk_proj",),
                         {"weights.0": "query", "weights.1": "key"})
        table += _scaled(f"{hf}attention.v_proj", attn + ("v_proj",), {"weight": "kernel"})
        table += _scaled(f"{hf}attention.out_proj", attn + ("out_proj",), {"weight": "kernel"},
                         in_axes=2)
        table += [Rule(f"{hf}attention.{name}", attn + (name,))
                  for name in ("q_scale", "k_scale", "lambdas")]
        table += _scaled(f"{hf}mlp.up_proj", layer + ("mlp", "up_proj"),
                         {"weights.0": "linear", "weights.1": "gate"})
        table += _scaled(f"{hf}mlp.down_proj", layer + ("mlp", "down_proj"), {"weight": "kernel"})
    if config.head == "Model":
        return table
    head = ("classifier",)
    table += _scaled("classifier.projection", head + ("projection",), {"weight": "kernel"})
    output = "emb2vocab" if config.head in LM_HEADS else "output_projection"
    table += _scaled(f"classifier.{output}", head + (output,), {"weight": "kernel"}, bias=True)
    return table


def canonical_state_dict(state_dict: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Refuse the HPLT variant; supply the output embedding from the input embedding when
    a checkpoint stores it only once (as training ties them)."""
    if any(".lambdas_v" in key for key in state_dict):
        raise BertJaxError(f"{source}: this is the HPLT 3.0 GPT-BERT variant (lambdas_v/_qk/_mlp/"
                           f"_out layer weights), which bert_jax does not support yet; "
                           f"NorBERT 4 checkpoints (ltg/norbert4-*) are supported")
    out = dict(state_dict)
    if _OUTPUT_EMBEDDING not in out and _EMBEDDING in out:
        out[_OUTPUT_EMBEDDING] = out[_EMBEDDING]
    return out


def ignorable_keys(config: GptBertConfig) -> set[str]:
    """Task-head models do not read the LM output layer (the reference ignores it too)."""
    if config.head in LM_HEADS:
        return set()
    return {f"classifier.emb2vocab.{name}" for name in ("weight", "bias", "scale")}


def tied_weights(config: GptBertConfig, stored: set[str]) -> dict[str, str]:
    """HF keys the model reads from another tensor, {key: source}: the LM output embedding,
    when a checkpoint does not store it (see `canonical_state_dict`)."""
    if config.head in LM_HEADS and _OUTPUT_EMBEDDING not in stored:
        return {_OUTPUT_EMBEDDING: _EMBEDDING}
    return {}


def hf_keys_for_save(config: GptBertConfig, key: str) -> tuple[str, ...]:
    return (key,)


def may_be_newly_initialised(key: str) -> bool:
    return key.startswith("classifier.")
