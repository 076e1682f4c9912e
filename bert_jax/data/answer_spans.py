"""Answer-span decoding for extractive QA, shared by the question-answering pipeline and the
SQuAD evaluation.

A span's score is start score + end score: logits in the evaluation (as run_qa.py's
utils_qa.py), log-probabilities in the pipeline (whose product of probabilities ranks spans
the same way). All valid spans are ranked exactly; utils_qa.py approximates this by pairing
only its n best starts with its n best ends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from bert_jax.data.squad import QAExample, QAFeature


def best_spans(start_T: np.ndarray, end_T: np.ndarray, allowed_T: np.ndarray, n_best: int,
               max_answer_length: int) -> list[tuple[int, int, float]]:
    """The `n_best` spans (start token, end token, score), best first, whose two ends are
    `allowed` (context tokens), with start <= end < start + max_answer_length."""
    positions = np.flatnonzero(allowed_T)
    if positions.size == 0 or n_best < 1:
        return []
    start, end = np.meshgrid(positions, positions, indexing="ij")
    valid = (end >= start) & (end - start < max_answer_length)
    scores = np.where(valid, start_T[start] + end_T[end], -np.inf).ravel()
    k = min(n_best, int(valid.sum()))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(start.flat[i]), int(end.flat[i]), float(scores[i])) for i in best]


def squad_predictions(examples: Sequence[QAExample], features: Sequence[QAFeature],
                      start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], *,
                      max_answer_length: int = 30,
                      version_2_with_negative: bool = False,
                      null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """The answer text for each example id, from its features' logits (rows may be padded):
    the best span over all its windows (utils_qa.py's n_best_size only bounds its search).

    With `version_2_with_negative`, the answer is "" when the null score (CLS start + end,
    the lowest over the example's windows) beats the best span by more than the threshold.
    """
    by_example = defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature.example_index].append(i)
    predictions = {}
    for index, example in enumerate(examples):
        best, null = None, np.inf
        for i in by_example[index]:
            feature = features[i]
            offsets = feature.context_offsets
            start_T = np.asarray(start_logits[i], np.float64)[:len(offsets)]
            end_T = np.asarray(end_logits[i], np.float64)[:len(offsets)]
            null = min(null, start_T[feature.cls_index] + end_T[feature.cls_index])
            spans = best_spans(start_T, end_T, np.array([o is not None for o in offsets]), 1,
                               max_answer_length)
            if spans and (best is None or spans[0][2] > best[2]):
                s, e, score = spans[0]
                best = (offsets[s][0], offsets[e][1], score)
        if best is None or (version_2_with_negative and null - best[2] > null_score_diff_threshold):
            predictions[example.id] = ""
        else:
            predictions[example.id] = example.context[best[0]:best[1]]
    return predictions
