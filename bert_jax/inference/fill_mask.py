"""Fill-mask, with the results of the `transformers` fill-mask pipeline.

For each mask token: the top-k tokens by softmax probability, each as
{"score", "token", "token_str", "sequence"}; one list per text with one mask, a list of
lists (one per mask) for a text with several.
"""

from __future__ import annotations

import jax
import numpy as np

from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.pretrained import PretrainedModel

MLM_HEADS = ("ForMaskedLM", "ForPreTraining")


def fill_mask(model: PretrainedModel, tokenizer: Tokenizer, texts: str | list[str],
              top_k: int = 5):
    """Predictions for every mask token; a single text gives a single result (as the pipeline)."""
    if model.config.head not in MLM_HEADS:
        raise BertJaxError(f"fill-mask needs a masked-LM head, but the model is "
                           f"{model.config.architecture}")
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise BertJaxError("the tokenizer has no mask token (mask_token in tokenizer_config.json)")
    single = isinstance(texts, str)
    encoded = [tokenizer.encode(t) for t in ([texts] if single else texts)]
    for text, ids in zip([texts] if single else texts, encoded):
        if mask_id not in ids:
            raise BertJaxError(f"no mask token {tokenizer.mask_token} in the input: {text!r}")

    length = max(len(ids) for ids in encoded)
    input_ids = np.full((len(encoded), length), tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    out = model(input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out.prediction_logits
    probs = np.asarray(jax.nn.softmax(logits.astype("float32"), axis=-1))

    results = []
    for row, ids in enumerate(encoded):
        positions = [i for i, token in enumerate(ids) if token == mask_id]
        per_mask = [_top_k(tokenizer, ids, probs[row, pos], pos, top_k, len(positions) == 1)
                    for pos in positions]
        results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    return results[0] if single else results


def _top_k(tokenizer, ids, probs_V, position, top_k, single_mask):
    best = np.argsort(-probs_V, kind="stable")[:top_k]
    predictions = []
    for token in best:
        filled = list(ids)
        filled[position] = int(token)
        predictions.append({
            "score": float(probs_V[token]),
            "token": int(token),
            "token_str": tokenizer.decode([int(token)]),
            "sequence": tokenizer.decode(filled, skip_special_tokens=single_mask),
        })
    return predictions
