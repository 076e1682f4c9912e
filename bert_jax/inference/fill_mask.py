"""Fill-mask, with the results of the `transformers` fill-mask pipeline.

For each mask token: the top-k tokens by softmax probability, each as
{"score", "token", "token_str", "sequence"}; one list per text with one mask, a list of
lists (one per mask) for a text with several.

Only the mask tokens' vocabulary logits are needed: BERT and Megatron-BERT models compute
them there alone (`masked_positions`, the vocabulary projection being a fifth of
BERT-base's forward); for the others they are picked out of all positions on the device.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from bert_jax.data.batching import bucket, bucket_lengths
from bert_jax.data.encoding import encode
from bert_jax.data.masking import positions_where
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.batching import run_in_buckets
from bert_jax.modeling.heads import at_positions
from bert_jax.pretrained import PretrainedModel

MLM_HEADS = ("ForMaskedLM", "ForPreTraining")


def fill_mask(model: PretrainedModel, tokenizer: Tokenizer, texts: str | list[str],
              top_k: int = 5, *, batch_size: int = 32):
    """Predictions for every mask token; a single text gives a single result (as the pipeline)."""
    if model.config.head not in MLM_HEADS:
        raise BertJaxError(f"fill-mask needs a masked-LM head, but the model is "
                           f"{model.config.architecture}")
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise BertJaxError("the tokenizer has no mask token (mask_token in tokenizer_config.json)")
    if top_k < 1:
        raise BertJaxError(f"top_k must be at least 1, got {top_k}")
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    encodings = encode(tokenizer, texts)
    for text, e in zip(texts, encodings):
        if mask_id not in e.ids:
            raise BertJaxError(f"no mask token {tokenizer.mask_token} in the input: {text!r}")

    best = run_in_buckets(model, encodings, functools.partial(_top_k_probs, k=top_k),
                          batch_size=batch_size,
                          extra_inputs=functools.partial(_mask_positions, mask_id=mask_id))
    results = []
    for ids, (probs_PK, tokens_PK) in zip((e.ids for e in encodings), best):
        positions = [i for i, token in enumerate(ids) if token == mask_id]
        per_mask = [_predictions(tokenizer, ids, probs_PK[slot], tokens_PK[slot], pos,
                                 len(positions) == 1) for slot, pos in enumerate(positions)]
        results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    return results[0] if single else results


def _mask_positions(inputs, mask_id: int) -> dict[str, np.ndarray]:
    """`masked_positions` `[B, P]` of a padded batch: P, the most masks in a row, rounded up to
    a power of two (one compiled shape per bucket)."""
    is_mask_BT = inputs["input_ids"] == mask_id
    slots = bucket(int(is_mask_BT.sum(axis=1).max()), bucket_lengths(is_mask_BT.shape[1], 1))
    return {"masked_positions": positions_where(is_mask_BT, slots)}


@functools.partial(jax.jit, static_argnames="k")
def _top_k_probs(out, inputs, k):
    """The k most likely tokens at each mask: (probabilities, token ids), each [B, P, k].
    The logits are the masks' own, or every position's when the model did not take
    `masked_positions` (then in `inputs`)."""
    logits = out.logits if hasattr(out, "logits") else out.prediction_logits
    if "masked_positions" in inputs:
        logits = at_positions(logits, inputs["masked_positions"])
    probs = jax.nn.softmax(logits.astype("float32"), axis=-1)
    return jax.lax.top_k(probs, min(k, probs.shape[-1]))


def _predictions(tokenizer, ids, probs_K, tokens_K, position, single_mask):
    predictions = []
    for score, token in zip(probs_K.tolist(), tokens_K.tolist()):
        filled = list(ids)
        filled[position] = token
        predictions.append({
            "score": score,
            "token": token,
            "token_str": tokenizer.decode([token]),
            "sequence": tokenizer.decode(filled, skip_special_tokens=single_mask),
        })
    return predictions
