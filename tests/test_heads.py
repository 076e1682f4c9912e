"""The task models' public surface, which the shared `TaskModel` must keep: every family's
call signatures (callers pass arguments positionally) and the params subtrees that the
conversion tables in `convert/` map."""

from __future__ import annotations

import inspect

import flax.linen as nn
import pytest

from bert_jax.convert.families import BERT, GPT_BERT
from bert_jax.modeling.presets import preset

BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
GPT_BERT_INPUTS = ("input_ids", "attention_mask", "position_ids")
OUTPUT_FLAGS = ("deterministic", "output_hidden_states")

SIGNATURES = {
    ("bert", "Model"): BERT_INPUTS + OUTPUT_FLAGS,
    ("bert", "ForPreTraining"): BERT_INPUTS + ("labels", "next_sentence_label",
                                               "masked_positions") + OUTPUT_FLAGS
    + ("loss_counts",),
    ("bert", "ForMaskedLM"): BERT_INPUTS + ("labels", "masked_positions") + OUTPUT_FLAGS
    + ("loss_counts",),
    ("bert", "ForNextSentencePrediction"): BERT_INPUTS + ("labels",) + OUTPUT_FLAGS,
    ("bert", "ForSequenceClassification"): BERT_INPUTS + ("labels",) + OUTPUT_FLAGS
    + ("segment_ids", "cls_positions"),
    ("bert", "ForTokenClassification"): BERT_INPUTS + ("labels",) + OUTPUT_FLAGS
    + ("segment_ids",),
    ("bert", "ForQuestionAnswering"): BERT_INPUTS + ("start_positions", "end_positions")
    + OUTPUT_FLAGS,
    ("bert", "ForMultipleChoice"): BERT_INPUTS + ("labels",) + OUTPUT_FLAGS,
    ("gpt-bert", "Model"): GPT_BERT_INPUTS + OUTPUT_FLAGS,
    ("gpt-bert", "ForMaskedLM"): GPT_BERT_INPUTS + ("labels",) + OUTPUT_FLAGS + ("loss_counts",),
    ("gpt-bert", "ForCausalLM"): GPT_BERT_INPUTS + ("labels",) + OUTPUT_FLAGS
    + ("past_key_values",),
    ("gpt-bert", "ForPreTraining"): GPT_BERT_INPUTS + ("segment_ids", "causal_rows", "labels")
    + OUTPUT_FLAGS + ("loss_counts",),
    ("gpt-bert", "ForSequenceClassification"): GPT_BERT_INPUTS + ("labels",) + OUTPUT_FLAGS
    + ("segment_ids", "cls_positions"),
    ("gpt-bert", "ForTokenClassification"): GPT_BERT_INPUTS + ("labels",) + OUTPUT_FLAGS
    + ("segment_ids",),
    ("gpt-bert", "ForQuestionAnswering"): GPT_BERT_INPUTS + ("start_positions", "end_positions")
    + OUTPUT_FLAGS,
    ("gpt-bert", "ForMultipleChoice"): GPT_BERT_INPUTS + ("labels",) + OUTPUT_FLAGS,
}

BERT_ENCODER = {"embeddings", "layer_0", "layer_1"}
GPT_BERT_ENCODER = {"word_embedding", "word_scale"} | {f"layer_{i}" for i in range(4)}
# (family, head) -> {top-level subtree: its children}; BERT's encoder with or without pooler
TREES = {
    ("bert", "Model"): {"bert": BERT_ENCODER | {"pooler"}},
    ("bert", "ForPreTraining"): {"bert": BERT_ENCODER | {"pooler"}, "nsp": {"dense"},
                                 "mlm": {"transform", "transform_norm", "bias"}},
    ("bert", "ForMaskedLM"): {"bert": BERT_ENCODER, "mlm": {"transform", "transform_norm", "bias"}},
    ("bert", "ForNextSentencePrediction"): {"bert": BERT_ENCODER | {"pooler"}, "nsp": {"dense"}},
    ("bert", "ForSequenceClassification"): {"bert": BERT_ENCODER | {"pooler"},
                                            "classifier": {"dense"}},
    ("bert", "ForTokenClassification"): {"bert": BERT_ENCODER, "classifier": {"dense"}},
    ("bert", "ForQuestionAnswering"): {"bert": BERT_ENCODER, "qa_outputs": {"dense"}},
    ("bert", "ForMultipleChoice"): {"bert": BERT_ENCODER | {"pooler"}, "classifier": {"dense"}},
    ("gpt-bert", "Model"): {"model": GPT_BERT_ENCODER},
    **{("gpt-bert", head): {"model": GPT_BERT_ENCODER,
                            "classifier": {"projection", "emb2vocab"}}
       for head in ("ForMaskedLM", "ForCausalLM", "ForPreTraining")},
    **{("gpt-bert", head): {"model": GPT_BERT_ENCODER,
                            "classifier": {"projection", "output_projection"}}
       for head in ("ForSequenceClassification", "ForTokenClassification",
                    "ForQuestionAnswering", "ForMultipleChoice")},
}


FAMILIES = {family.name: family for family in (BERT, GPT_BERT)}


def _id(case):
    return "-".join(case)


def test_every_head_is_covered():
    assert set(SIGNATURES) == {(name, head) for name, family in FAMILIES.items()
                               for head in family.task_models}
    assert set(TREES) == set(SIGNATURES)


@pytest.mark.parametrize("case", list(SIGNATURES), ids=_id)
def test_call_signature(case):
    family, head = case
    parameters = list(inspect.signature(FAMILIES[family].task_models[head].__call__).parameters)
    assert tuple(parameters[1:]) == SIGNATURES[case]


@pytest.mark.parametrize("case", list(TREES), ids=_id)
def test_params_tree(case):
    family, head = case
    config = preset("tiny" if family == "bert" else "norbert4-tiny").with_head(head)
    params = nn.meta.unbox(FAMILIES[family].abstract_variables(config)["params"])
    assert {name: set(subtree) for name, subtree in params.items()} == TREES[case]
