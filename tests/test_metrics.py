"""Metrics against the libraries and formulas the field reports them with: scikit-learn,
SciPy, seqeval (and its README's own figures), on random logits and tags."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import seqeval.metrics
from seqeval.scheme import IOB2, IOBES
from sklearn import metrics as skm

from bert_jax.errors import BertJaxError
from bert_jax.training.metrics import (
    compute_metrics,
    entity_metrics,
    glue_metrics,
    metric_names,
    predictions_from_logits,
    token_classification_metrics,
)


@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(200, 2))
    labels = rng.integers(0, 2, 200)
    predicted = logits.argmax(-1)
    scores = compute_metrics(metric_names("single_label_classification", 2, "glue/mrpc")
                             + ("matthews_correlation",),
                             predictions_from_logits(logits, "single_label_classification"),
                             labels)
    tp = np.sum((predicted == 1) & (labels == 1))
    fp, fn = np.sum((predicted == 1) & (labels == 0)), np.sum((predicted == 0) & (labels == 1))
    tn = len(labels) - tp - fp - fn
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert scores["accuracy"] == pytest.approx((tp + tn) / len(labels))
    assert scores["matthews_correlation"] == pytest.approx(
        (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))))

    logits = rng.normal(size=(300, 3))
    labels = rng.integers(0, 3, 300)
    scores = compute_metrics(metric_names("single_label_classification", 3) + ("f1_micro",),
                             predictions_from_logits(logits, "single_label_classification"),
                             labels)
    assert scores == pytest.approx({
        "accuracy": skm.accuracy_score(labels, logits.argmax(-1)),
        "f1_macro": skm.f1_score(labels, logits.argmax(-1), average="macro"),
        "f1_micro": skm.f1_score(labels, logits.argmax(-1), average="micro")})


def test_regression_and_multi_label_metrics():
    rng = np.random.default_rng(3)
    targets = rng.random(100) * 5
    logits = targets[:, None] + rng.normal(size=(100, 1))
    scores = compute_metrics(glue_metrics("stsb"), predictions_from_logits(logits, "regression"),
                             targets)
    assert scores["pearson"] == pytest.approx(np.corrcoef(logits[:, 0], targets)[0, 1])
    ranks = scipy.stats.rankdata(logits[:, 0]), scipy.stats.rankdata(targets)
    assert scores["spearmanr"] == pytest.approx(np.corrcoef(*ranks)[0, 1])

    logits = rng.normal(size=(80, 4))
    labels = (rng.random((80, 4)) < 0.3).astype(np.float32)  # multi-hot, as the data gives it
    predicted = (scipy.special.expit(logits) > 0.5).astype(int)
    scores = compute_metrics(metric_names("multi_label_classification", 4),
                             predictions_from_logits(logits, "multi_label_classification"), labels)
    assert scores == pytest.approx({
        "f1_micro": skm.f1_score(labels.astype(int), predicted, average="micro"),
        "f1_macro": skm.f1_score(labels.astype(int), predicted, average="macro"),
        "accuracy": np.mean((predicted == labels).all(-1))})


def test_glue_metrics_as_reported():
    """The metrics of Hugging Face evaluate's `glue` (BERT's table reports the first)."""
    reported = {"cola": {"matthews_correlation"}, "stsb": {"pearson", "spearmanr"},
                "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}, "sst2": {"accuracy"},
                "mnli": {"accuracy"}, "mnli_mismatched": {"accuracy"},
                "mnli_matched": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
                "wnli": {"accuracy"}}
    for task, names in reported.items():
        assert set(glue_metrics(task)) == names == set(glue_metrics(f"glue/{task.upper()}"))
    assert glue_metrics("mrpc")[0] == "f1" and glue_metrics("stsb")[0] == "spearmanr"
    with pytest.raises(BertJaxError, match="unknown GLUE task 'squad'"):
        glue_metrics("squad")
    with pytest.raises(BertJaxError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], np.zeros(2), np.zeros(2))


def test_seqeval_readme_figures():
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_metrics(y_true, y_pred)["f1"] == 0.50
    assert entity_metrics([["B-NP", "I-NP", "O"]], [["I-NP", "I-NP", "O"]])["f1"] == 1.0
    assert entity_metrics([["B-NP", "I-NP", "O"]], [["I-NP", "I-NP", "O"]], mode="strict")[
        "f1"] == 0.0


@pytest.mark.parametrize("scheme", ["IOB2", "BIOES"])
def test_token_classification_metrics_match_seqeval(scheme):
    """Label ids with -100 at special tokens, later sub-tokens and padding -> seqeval on the
    labelled positions only, default and strict."""
    prefixes = "BI" if scheme == "IOB2" else "BIES"
    id2label = ["O"] + [f"{p}-{t}" for t in ("PER", "LOC", "ORG") for p in prefixes]
    rng = np.random.default_rng(4)
    labels = rng.integers(0, len(id2label), (16, 20))
    labels[rng.random(labels.shape) < 0.4] = -100
    labels[3] = -100  # an all-padding row
    predictions = np.where(rng.random(labels.shape) < 0.6, np.maximum(labels, 0),
                           rng.integers(0, len(id2label), labels.shape))
    true = [[id2label[y] for y in row if y != -100] for row in labels]
    pred = [[id2label[p] for p, y in zip(prow, row) if y != -100]
            for prow, row in zip(predictions, labels)]
    for mode, kwargs in (("default", {}),
                         ("strict", {"mode": "strict", "scheme": {"IOB2": IOB2,
                                                                  "BIOES": IOBES}[scheme]})):
        scores = token_classification_metrics(predictions, labels, id2label, scheme=scheme,
                                               mode=mode)
        assert scores == pytest.approx({
            "precision": seqeval.metrics.precision_score(true, pred, **kwargs),
            "recall": seqeval.metrics.recall_score(true, pred, **kwargs),
            "f1": seqeval.metrics.f1_score(true, pred, **kwargs),
            "accuracy": seqeval.metrics.accuracy_score(true, pred)})
    assert 0 < scores["f1"] < 1
