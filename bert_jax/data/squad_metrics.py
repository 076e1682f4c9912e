"""SQuAD exact match and F1, with the official evaluation scripts' definitions.

Answers are compared after the official normalisation (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed); F1 is over the bag of normalised words.
Each question scores its best match among its gold answers. Unanswerable questions (SQuAD
2.0, no gold answers) have the single gold answer "", which only the empty prediction
matches (F1 1 when both are empty), as the v2.0 script scores them; the v1.1 script gives
the same scores on its data (gold answers that normalise to nothing aside).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from bert_jax.data.squad import QAExample
from bert_jax.errors import BertJaxError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: Sequence[QAExample],
                  predictions: Mapping[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent and "total"; when some questions are unanswerable,
    also the official v2.0 split into "HasAns_*" and "NoAns_*" (exact_match, f1, total)."""
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise BertJaxError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    scores = {}
    for e in examples:
        golds = [a.text for a in e.answers if normalize_answer(a.text)] or [""]
        prediction = predictions[e.id]
        scores[e.id] = (max(exact_match(prediction, g) for g in golds),
                        max(f1(prediction, g) for g in golds))
    out = _averages(list(scores.values()))
    if any(not e.answers for e in examples):
        for name, has_answer in (("HasAns", True), ("NoAns", False)):
            part = [scores[e.id] for e in examples if bool(e.answers) == has_answer]
            if part:
                out.update({f"{name}_{k}": v for k, v in _averages(part).items()})
    return out


def _averages(scores: list[tuple[float, float]]) -> dict[str, float]:
    n = len(scores)
    return {"exact_match": 100.0 * sum(s[0] for s in scores) / n if n else 0.0,
            "f1": 100.0 * sum(s[1] for s in scores) / n if n else 0.0,
            "total": n}
