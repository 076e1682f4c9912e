"""Extractive question answering with the results of the `transformers` question-answering
pipeline (as of transformers 4.x; 5.x dropped it): {"score", "start", "end", "answer"}.

A long context is read in overlapping windows. In each window the start and end logits are
softmaxed over the context tokens and CLS, and a span scores start prob x end prob; spans
are widened to whole words (`align_to_words`), and the scores of equal answers (ignoring
case) add up across spans and windows. With `handle_impossible_answer` the empty answer
competes with the lowest CLS score over the windows.
"""

from __future__ import annotations

import jax
import numpy as np
import tokenizers
from scipy.special import log_softmax

from bert_jax.data.answer_spans import best_spans
from bert_jax.data.squad import QAExample, prepare_features
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import PretrainedModel

MASKED = -10000.0  # the pipeline's logit for tokens outside the context


def answer(model: PretrainedModel, tokenizer: Tokenizer, question: str | list[str],
           context: str | list[str], top_k: int = 1, *, max_answer_len: int = 15,
           max_seq_len: int | None = None, doc_stride: int | None = None,
           handle_impossible_answer: bool = False, align_to_words: bool = True,
           batch_size: int = 32):
    """The best answer (top_k=1) or answers of each question in its context.

    question / context: one each, a list of questions about one context, or two lists.
    max_seq_len: window length in tokens (default min(384, the model's limit));
    doc_stride: overlap of windows (default min(max_seq_len // 2, 128)).
    """
    if model.config.head != "ForQuestionAnswering":
        raise BertJaxError(f"question-answering needs a question-answering head, but the model "
                           f"is {model.config.architecture}")
    if top_k < 1 or max_answer_len < 1:
        raise BertJaxError(f"top_k and max_answer_len must be at least 1, got {top_k} and "
                           f"{max_answer_len}")
    single = isinstance(question, str)
    questions = [question] if single else list(question)
    contexts = [context] * len(questions) if isinstance(context, str) else list(context)
    if len(contexts) != len(questions):
        raise BertJaxError(f"{len(questions)} questions but {len(contexts)} contexts")
    if any(not text for text in questions + contexts):
        raise BertJaxError("questions and contexts must not be empty")
    max_seq_len = max_seq_len or min(384, model.config.max_length[1])
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    if doc_stride > max_seq_len:
        raise BertJaxError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")

    examples = [QAExample(str(i), q, c) for i, (q, c) in enumerate(zip(questions, contexts))]
    features = prepare_features(examples, tokenizer, max_length=max_seq_len, doc_stride=doc_stride)
    logits = run_in_buckets(model, [f.encoding for f in features], _span_logits,
                            batch_size=batch_size)
    candidates = top_k * 2 + 10 if align_to_words else top_k  # aligning may merge some
    answers = [[] for _ in examples]
    null_scores = [np.inf] * len(examples)
    for feature, (start_T, end_T) in zip(features, logits):
        index, cls = feature.example_index, feature.cls_index
        context_T = np.array([o is not None for o in feature.context_offsets])
        scored_T = context_T.copy()  # the softmax runs over the context and CLS
        scored_T[cls] = True
        start_T = log_softmax(np.where(scored_T, start_T[:len(context_T)], MASKED))
        end_T = log_softmax(np.where(scored_T, end_T[:len(context_T)], MASKED))
        null_scores[index] = min(null_scores[index], float(np.exp(start_T[cls] + end_T[cls])))
        for s, e, score in best_spans(start_T, end_T, context_T, candidates, max_answer_len):
            first, last = _char_span(feature.encoding, s, e, align_to_words)
            _add(answers[index], examples[index].context, first, last, float(np.exp(score)))

    results = []
    for found, null_score in zip(answers, null_scores):
        if handle_impossible_answer:
            found.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
        best = sorted(found, key=lambda a: -a["score"])[:top_k]
        results.append(best[0] if top_k == 1 and best else best)
    return results[0] if single else results


@jax.jit
def _span_logits(out, inputs):
    return out.start_logits.astype("float32"), out.end_logits.astype("float32")


def _char_span(encoding: tokenizers.Encoding, start: int, end: int,
               align_to_words: bool) -> tuple[int, int]:
    """The span's characters in the context, widened to whole words when asked (and known)."""
    if align_to_words:
        words = encoding.token_to_word(start), encoding.token_to_word(end)
        if None not in words:
            first, last = (encoding.word_to_chars(w, 1) for w in words)
            if first is not None and last is not None:
                return first[0], last[1]
    return encoding.offsets[start][0], encoding.offsets[end][1]


def _add(answers: list[dict], context: str, start: int, end: int, score: float) -> None:
    """Add an answer, or its score to an earlier answer with the same text (ignoring case)."""
    text = context[start:end]
    for earlier in answers:
        if earlier["answer"].lower() == text.lower():
            earlier["score"] += score
            return
    answers.append({"score": score, "start": start, "end": end, "answer": text})
