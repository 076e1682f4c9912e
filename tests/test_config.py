"""Configs read and write HF config.json; presets have the published sizes; every parameter
carries logical axis names."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import pytest
from conftest import make_hf_model, save_hf_model, torch, transformers

import bert_jax
from bert_jax.convert.families import BERT
from bert_jax.modeling.config import BERT_PRESETS, BertConfig


@pytest.mark.parametrize("model_type,head", [("bert", "ForTokenClassification"),
                                             ("megatron-bert", "ForPreTraining")])
def test_config_json_round_trip(tmp_path, model_type, head):
    """Every key transformers wrote comes back with the same value (labels included);
    optional fields at their default (None) may be left out."""
    save_hf_model(make_hf_model(model_type, head, id2label={0: "O", 1: "B-PER", 2: "I-PER"}),
                  tmp_path / "hf")
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    config = BertConfig.from_json_file(tmp_path / "hf" / "config.json")
    assert config.labels == ("O", "B-PER", "I-PER")
    assert config.norm_placement == ("pre" if model_type == "megatron-bert" else "post")
    config.save_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    # transformers leaves label2id empty when only id2label is given; we write the inverse.
    assert written.pop("label2id") == {"O": 0, "B-PER": 1, "I-PER": 2}
    original.pop("label2id")
    assert written == {k: v for k, v in original.items() if k in written or v is not None}


def count_torch_params(config: BertConfig, cls_name: str) -> int:
    hf_config = getattr(transformers, config.class_prefix + "Config")(
        **{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    with torch.device("meta"):
        model = getattr(transformers, config.class_prefix + cls_name)(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BERT_PRESETS))
def test_presets_match_transformers_parameter_count(name):
    """Each preset has exactly as many parameters as the transformers model of that config."""
    config = bert_jax.preset(name)
    abstract = nn.meta.unbox(BERT.abstract_variables(config)["params"])
    ours = sum(x.size for x in jax.tree.leaves(abstract))
    assert ours == count_torch_params(config, config.head)


def test_swedish_megatron_preset():
    config = bert_jax.preset("bert-large-swedish-cased")
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads,
            config.max_position_embeddings, config.vocab_size) == (
                "megatron-bert", 24, 16, 1024, 30592)


@pytest.mark.parametrize("head", ["ForPreTraining", "ForMultipleChoice", "ForQuestionAnswering"])
def test_every_param_has_logical_axes(head):
    config = bert_jax.preset("tiny", architectures=("Bert" + head,))
    boxed = BERT.abstract_variables(config)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim and all(x.names) for x in leaves)


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "roberta"}, "model_type 'roberta'"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "is_decoder"),
    ({"architectures": ["BertLMHeadModel"]}, "BertLMHeadModel"),
    ({"hidden_size": 30}, "num_attention_heads"),
])
def test_bad_config_fields_are_named(change, needle):
    hf = {**bert_jax.preset("tiny").to_hf_dict(), **change}
    with pytest.raises(bert_jax.BertJaxError, match="config.json") as info:
        BertConfig.from_hf_dict(hf)
    assert needle in str(info.value)


def test_cudnn_backend_needs_half_precision():
    with pytest.raises(bert_jax.BertJaxError, match="bfloat16"):
        bert_jax.preset("tiny", attention_backend="cudnn")
    assert bert_jax.preset("tiny", attention_backend="cudnn", dtype="bfloat16").dtype == "bfloat16"
