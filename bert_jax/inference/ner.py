"""Named-entity recognition (token classification) with the results of the `transformers`
"ner" pipeline, for every aggregation strategy.

- "none": one entity per token, {"entity", "score", "index", "word", "start", "end"}.
- "simple": adjacent tokens with the same type (B-/I- prefixes dropped; a B- starts a new
  group) become one {"entity_group", "score" (mean), "word", "start", "end"}.
- "first" / "average" / "max": each word first gets one label (its first sub-token's, the
  argmax of its averaged scores, or its most confident sub-token's), then words are grouped
  as in "simple". Sub-tokens are told apart by the tokenizer's continuing-subword prefix
  ("##"), else by the absence of a space before them.

Labels listed in `ignore_labels` are dropped; texts longer than the model's limit are cut.
"""

from __future__ import annotations

import jax
import numpy as np
import tokenizers

from bert_jax.data.encoding import encode
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.pretrained import PretrainedModel

AGGREGATIONS = ("none", "simple", "first", "average", "max")


def ner(model: PretrainedModel, tokenizer: Tokenizer, texts: str | list[str],
        aggregation: str = "none", ignore_labels: tuple[str, ...] = ("O",), *,
        batch_size: int = 32):
    """The entities of each text; a single text gives a single list (as the pipeline)."""
    if model.config.head != "ForTokenClassification":
        raise BertJaxError(f"ner needs a token-classification head, but the model is "
                           f"{model.config.architecture}")
    if aggregation not in AGGREGATIONS:
        raise BertJaxError(f"unknown aggregation {aggregation!r} (expected one of "
                           f"{', '.join(AGGREGATIONS)})")
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    config = model.config
    labels = config.labels or tuple(f"LABEL_{i}" for i in range(config.num_labels))
    encodings = encode(tokenizer, texts, max_length=config.max_length[1])
    probs = run_in_buckets(model, encodings, _label_probs, batch_size=batch_size)
    results = []
    for text, encoding, probs_TC in zip(texts, encodings, probs):
        tokens = _tokens(tokenizer, text, encoding, probs_TC)
        entities = _aggregate(tokenizer.backend, tokens, labels, aggregation)
        results.append([e for e in entities
                        if e.get("entity", e.get("entity_group")) not in ignore_labels])
    return results[0] if single else results


@jax.jit
def _label_probs(out, inputs):
    return jax.nn.softmax(out.logits.astype("float32"), axis=-1)


def _tokens(tokenizer: Tokenizer, text: str, encoding: tokenizers.Encoding, probs_TC) -> list[dict]:
    """The non-special tokens with their label scores, character span and sub-word flag."""
    model = tokenizer.backend.model
    subword_prefix = getattr(model, "continuing_subword_prefix", None)
    unk = getattr(model, "unk_token", None)
    unk_id = tokenizer.backend.token_to_id(unk) if unk else None
    tokens = []
    for index, (token_id, word, (start, end), special) in enumerate(zip(
            encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask)):
        if special:
            continue
        if subword_prefix:
            is_subword = len(word) != end - start
        else:
            is_subword = start > 0 and " " not in text[start - 1:start + 1]
        if token_id == unk_id:
            word, is_subword = text[start:end], False
        tokens.append({"word": word, "scores": probs_TC[index], "start": start, "end": end,
                       "index": index, "is_subword": is_subword})
    return tokens


def _aggregate(backend: tokenizers.Tokenizer, tokens: list[dict], labels, aggregation: str):
    if aggregation in ("none", "simple"):
        entities = [{"entity": labels[int(t["scores"].argmax())], "score": float(t["scores"].max()),
                     "index": t["index"], "word": t["word"], "start": t["start"], "end": t["end"]}
                    for t in tokens]
        if aggregation == "none":
            return entities
    else:
        words, word = [], []
        for token in tokens:
            if word and not token["is_subword"]:
                words.append(word)
                word = []
            word.append(token)
        words += [word] if word else []
        entities = [_word_entity(backend, w, labels, aggregation) for w in words]
    return _group(backend, entities)


def _word_entity(backend, tokens: list[dict], labels, aggregation: str) -> dict:
    """One label for a word's sub-tokens."""
    if aggregation == "first":
        scores = tokens[0]["scores"]
    elif aggregation == "max":
        scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
    best = int(scores.argmax())
    return {"entity": labels[best], "score": float(scores[best]),
            "word": _join(backend, [t["word"] for t in tokens]),
            "start": tokens[0]["start"], "end": tokens[-1]["end"]}


def _group(backend, entities: list[dict]) -> list[dict]:
    """Adjacent entities of one type become a group; a B- tag always starts a new one."""
    groups, current = [], []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if current and not (tag == _tag(current[-1]["entity"])[1] and bi != "B"):
            groups.append(current)
            current = []
        current.append(entity)
    groups += [current] if current else []
    return [{"entity_group": g[0]["entity"].split("-", 1)[-1],
             "score": float(np.nanmean([e["score"] for e in g])),
             "word": _join(backend, [e["word"] for e in g]),
             "start": g[0]["start"], "end": g[-1]["end"]} for g in groups]


def _tag(label: str) -> tuple[str, str]:
    """("B" | "I", type); a label without a B-/I- prefix counts as a continuation."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _join(backend, tokens: list[str]) -> str:
    """transformers' `convert_tokens_to_string`: the tokenizer's decoder over the tokens."""
    return backend.decoder.decode(tokens) if backend.decoder is not None else " ".join(tokens)
