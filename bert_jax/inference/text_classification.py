"""Text classification with the results of the `transformers` text-classification pipeline
(called with `top_k`): for each text, the `top_k` labels by score as {"label", "score"}.

Scores go through `function_to_apply`: by default none for regression, sigmoid for
multi-label models or a single label, softmax otherwise (the config's `problem_type` and
label count decide, as in `transformers`). A text pair is given as {"text", "text_pair"}.
A text longer than the model's positions is an error unless `truncation` is set (the
pipeline's `truncation=True`: cut to the model's length, longest sequence of a pair first).
"""

from __future__ import annotations

import functools

import jax

from bert_jax.data.encoding import encode
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import PretrainedModel

FUNCTIONS = ("softmax", "sigmoid", "none")
Text = str | dict[str, str]


def classify(model: PretrainedModel, tokenizer: Tokenizer, texts: Text | list[Text],
             top_k: int | None = 1, function_to_apply: str | None = None, *,
             batch_size: int = 32, truncation: bool = False):
    """The best `top_k` labels (all when None) per text; a single text gives a single list."""
    config = model.config
    if config.head != "ForSequenceClassification":
        raise BertJaxError(f"text-classification needs a sequence-classification head, but the "
                           f"model is {config.architecture}")
    if top_k is not None and top_k < 1:
        raise BertJaxError(f"top_k must be at least 1 (or None for all labels), got {top_k}")
    function = function_to_apply or default_function(config.problem_type, config.num_labels)
    if function not in FUNCTIONS:
        raise BertJaxError(f"unknown function_to_apply {function!r} (expected one of "
                           f"{', '.join(FUNCTIONS)})")
    single = isinstance(texts, (str, dict))
    texts = [texts] if single else list(texts)
    firsts, pairs = zip(*(_pair(t) for t in texts)) if texts else ((), ())
    if None in pairs and any(p is not None for p in pairs):
        raise BertJaxError("give a text_pair for every text or for none")
    encodings = encode(tokenizer, firsts, pairs,
                       max_length=config.max_length[1] if truncation else None)
    scores = run_in_buckets(model, encodings, functools.partial(_scores, function=function),
                            batch_size=batch_size)
    labels = config.labels or tuple(f"LABEL_{i}" for i in range(config.num_labels))
    results = []
    for scores_C in scores:
        ranked = sorted(zip(labels, scores_C.tolist()), key=lambda ls: -ls[1])
        results.append([{"label": label, "score": score} for label, score in ranked[:top_k]])
    return results[0] if single else results


def default_function(problem_type: str | None, num_labels: int) -> str:
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def _pair(text: Text) -> tuple[str, str | None]:
    if isinstance(text, dict):
        if "text" not in text:
            raise BertJaxError(f"a text pair needs the keys 'text' and 'text_pair', got {text}")
        return text["text"], text.get("text_pair")
    return text, None


@functools.partial(jax.jit, static_argnames="function")
def _scores(out, inputs, function):
    logits = out.logits.astype("float32")
    if function == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits) if function == "sigmoid" else logits
