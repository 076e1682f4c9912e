"""MFU's numerator and denominator: training FLOPs per token and the chip's peak."""

from __future__ import annotations

import jax
import pytest

from bert_jax.convert.families import BERT, GPT_BERT
from bert_jax.modeling.presets import preset
from bert_jax.training.flops import peak_flops, training_flops_per_token


def parameters(family, config) -> int:
    return sum(x.size for x in jax.tree.leaves(family.abstract_variables(config)["params"]))


def test_bert_large_token_costs_what_the_issue_says():
    """About 2.2 GFLOP per BERT-large token at seq 512 (6 N + attention), by hand here."""
    config = preset("bert-large-cased", architectures=("BertForMaskedLM",))
    n = parameters(BERT, config)
    expected = 6 * n + 24 * 12 * 512 * 1024  # 24 layers x (QK^T + AV) x 3 passes
    assert training_flops_per_token(config, n, 512) == expected
    assert training_flops_per_token(config, n, 512) == pytest.approx(2.2e9, rel=0.03)


def test_gpt_bert_local_layers_count_their_window():
    config = preset("norbert4-tiny")  # local window 8, global 24, max 256
    n = parameters(GPT_BERT, config)
    spans = [min(200, 2 * config.window(layer) + 1) for layer in range(config.num_layers)]
    assert min(spans) < 200  # some layers are windowed at this length
    assert training_flops_per_token(config, n, 200) == 6 * n + 12 * 64 * sum(spans)


def test_peak_is_known_for_accelerators_only():
    assert peak_flops(jax.devices("cpu")[0]) is None
