"""Evaluation metrics as the field reports them, computed by the libraries it reports them with:
scikit-learn (accuracy, F1, Matthews correlation), SciPy (Pearson, Spearman) and seqeval
(entity-level precision, recall and F1), as Hugging Face's `evaluate` glue and seqeval metrics;
SQuAD exact match and F1 with the official evaluation scripts' definitions (no library here
computes them).

The finetune trainer gathers the eval split's logits and labels (rows with example_id -1
dropped), then calls, for sequence classification,
`compute_metrics(metric_names(problem_type, num_labels, glue_task), predictions_from_logits(
logits, problem_type), labels)`, for token classification
`token_classification_metrics(logits.argmax(-1), labels, id2label, scheme=...)`, and for
question answering `squad_metrics(examples, squad_predictions(examples, features, ...))`. The
first name `metric_names` gives is the task's headline figure, to select the best checkpoint.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
import scipy.stats
import seqeval.metrics
import seqeval.scheme
import sklearn.metrics

from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.squad import QAExample
from bert_jax.errors import BertJaxError

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: sklearn.metrics.accuracy_score(y, p),  # multi-label: exact match
    "f1": lambda p, y: sklearn.metrics.f1_score(y, p),  # binary, class 1 positive
    "f1_macro": lambda p, y: sklearn.metrics.f1_score(y, p, average="macro"),
    "f1_micro": lambda p, y: sklearn.metrics.f1_score(y, p, average="micro"),
    "matthews_correlation": lambda p, y: sklearn.metrics.matthews_corrcoef(y, p),
    "pearson": lambda p, y: scipy.stats.pearsonr(p, y)[0],
    "spearmanr": lambda p, y: scipy.stats.spearmanr(p, y)[0],
}
# What the GLUE papers and leaderboard report per task, headline first (BERT's table: F1 for
# QQP and MRPC, Spearman for STS-B, Matthews for CoLA, accuracy for the others).
GLUE_METRICS = {
    "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"), "stsb": ("spearmanr", "pearson"), "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",), "mnli_mismatched": ("accuracy",), "qnli": ("accuracy",),
    "rte": ("accuracy",), "wnli": ("accuracy",), "ax": ("matthews_correlation",),
}
SEQEVAL_SCHEMES = {"IOB2": seqeval.scheme.IOB2, "BIOES": seqeval.scheme.IOBES}
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def glue_metrics(task: str) -> tuple[str, ...]:
    """The metrics reported for GLUE task `task` ("mnli", "glue/mnli", "MNLI", ...)."""
    name = task.lower().removeprefix("glue/").replace("-", "")
    if name not in GLUE_METRICS:
        raise BertJaxError(f"unknown GLUE task {task!r} (known: {', '.join(GLUE_METRICS)})")
    return GLUE_METRICS[name]


def metric_names(problem_type: str, num_labels: int, glue_task: str | None = None
                 ) -> tuple[str, ...]:
    """The GLUE task's metrics, else those usual for the problem type."""
    if glue_task is not None:
        return glue_metrics(glue_task)
    if problem_type == "regression":
        return "pearson", "spearmanr"
    if problem_type == "multi_label_classification":
        return "f1_micro", "f1_macro", "accuracy"
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy", "f1_macro")


def predictions_from_logits(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Class ids `[N]` (argmax), multi-hot `[N, C]` (logit > 0, i.e. sigmoid > 0.5) or
    regression values `[N]`, as transformers' examples take them."""
    logits = np.asarray(logits)
    if problem_type == "regression":
        return logits.reshape(len(logits))
    if problem_type == "multi_label_classification":
        return (logits > 0).astype(np.int64)
    return logits.argmax(-1)


def compute_metrics(names: tuple[str, ...] | list[str], predictions: np.ndarray,
                    labels: np.ndarray) -> dict[str, float]:
    """`{name: value}` for each metric in `names` (keys of METRICS)."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise BertJaxError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 2:  # multi-label: multi-hot rows, as integers for scikit-learn
        predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
    return {name: float(METRICS[name](predictions, labels)) for name in names}


def entity_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]], *,
                   scheme: str = "IOB2", mode: str = "default") -> dict[str, float]:
    """seqeval's entity-level precision, recall, F1 (micro over entities) and token accuracy.

    mode "default" reads entities as conlleval does (an I-X after O opens an entity);
    "strict" counts only entities well formed in `scheme` (IOB2 or BIOES).
    """
    if mode not in ("default", "strict"):
        raise BertJaxError(f"entity metrics: mode {mode!r} is not 'default' or 'strict'")
    if scheme not in SEQEVAL_SCHEMES:
        raise BertJaxError(f"entity metrics: scheme {scheme!r} is not one of "
                           f"{', '.join(SEQEVAL_SCHEMES)}")
    kwargs = {"mode": "strict", "scheme": SEQEVAL_SCHEMES[scheme]} if mode == "strict" else {}
    scores = {name: getattr(seqeval.metrics, f"{name}_score")(true_tags, predicted_tags,
                                                              zero_division=0, **kwargs)
              for name in ("precision", "recall", "f1")}  # 0 with no entity, and no warning
    return scores | {"accuracy": seqeval.metrics.accuracy_score(true_tags, predicted_tags)}


def token_classification_metrics(predictions_BT: np.ndarray, labels_BT: np.ndarray,
                                 id2label: tuple[str, ...] | list[str], *, scheme: str = "IOB2",
                                 mode: str = "default") -> dict[str, float]:
    """`entity_metrics` of predicted label ids against the aligned labels, at the labelled
    positions only (labels -100 mark special tokens, padding and later sub-tokens)."""
    predictions_BT, labels_BT = np.asarray(predictions_BT), np.asarray(labels_BT)
    keep_BT = labels_BT != IGNORE_INDEX
    true = [[id2label[i] for i in row[keep]] for row, keep in zip(labels_BT, keep_BT)]
    predicted = [[id2label[i] for i in row[keep]] for row, keep in zip(predictions_BT, keep_BT)]
    return entity_metrics(true, predicted, scheme=scheme, mode=mode)


def squad_metrics(examples: Sequence[QAExample],
                  predictions: Mapping[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent and "total"; when some questions are unanswerable,
    also the official v2.0 split into "HasAns_*" and "NoAns_*" (exact_match, f1, total).

    Answers are compared after the official normalisation (lower case, punctuation and the
    articles a/an/the removed, whitespace collapsed); F1 is over the bag of normalised words.
    Each question scores its best match among its gold answers. Unanswerable questions (SQuAD
    2.0, no gold answers) have the single gold answer "", which only the empty prediction
    matches (F1 1 when both are empty), as the v2.0 script scores them; the v1.1 script gives
    the same scores on its data (gold answers that normalise to nothing aside).
    """
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise BertJaxError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    scores = {}
    for e in examples:
        golds = [a.text for a in e.answers if _normalize_answer(a.text)] or [""]
        prediction = predictions[e.id]
        scores[e.id] = (max(_exact_match(prediction, g) for g in golds),
                        max(_answer_f1(prediction, g) for g in golds))
    out = _squad_averages(list(scores.values()))
    if any(not e.answers for e in examples):
        for name, has_answer in (("HasAns", True), ("NoAns", False)):
            part = [scores[e.id] for e in examples if bool(e.answers) == has_answer]
            if part:
                out.update({f"{name}_{k}": v for k, v in _squad_averages(part).items()})
    return out


def _normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _exact_match(prediction: str, gold: str) -> float:
    return float(_normalize_answer(prediction) == _normalize_answer(gold))


def _answer_f1(prediction: str, gold: str) -> float:
    predicted, expected = _normalize_answer(prediction).split(), _normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def _squad_averages(scores: list[tuple[float, float]]) -> dict[str, float]:
    n = len(scores)
    return {"exact_match": 100.0 * sum(s[0] for s in scores) / n if n else 0.0,
            "f1": 100.0 * sum(s[1] for s in scores) / n if n else 0.0,
            "total": n}
