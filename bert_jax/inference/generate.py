"""Text generation with GPT-BERT in its causal mode: a KV cache and a jit-compiled loop.

Prompts are left-padded into one batch; positions count real tokens only, so every row
decodes as if alone. Each layer's cache is a ring buffer of its attention window (see
`gpt_bert.init_cache`), so memory stays bounded however long the output grows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.errors import BertJaxError
from bert_jax.modeling.gpt_bert import init_cache
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.modeling.scan import to_unrolled, unscanned
from bert_jax.pretrained import PretrainedModel


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when `do_sample` is False; else temperature, then top-k, then top-p (nucleus)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise BertJaxError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise BertJaxError(f"top_k must be 0 (no limit) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BertJaxError(f"top_p must lie in (0, 1], got {self.top_p}")


def causal_model(model: PretrainedModel) -> PretrainedModel:
    """The same GPT-BERT weights in causal mode (NorBERT 4 ships them as a masked LM), with
    the layers unrolled: decoding keeps a per-layer cache."""
    config = model.config
    if not isinstance(config, GptBertConfig) or config.head not in ("ForMaskedLM", "ForCausalLM"):
        raise BertJaxError(f"generation needs a GPT-BERT language model, but the model is "
                           f"{config.architecture}")
    if config.head == "ForCausalLM" and not config.scan_layers:
        return model
    return PretrainedModel(unscanned(config).with_head("ForCausalLM"),
                           to_unrolled(config, model.params), model.source_dir)


def generate(model: PretrainedModel, prompts: list[list[int]], max_new_tokens: int = 32, *,
             sampling: Sampling = Sampling(), stop_token_ids: tuple[int, ...] | None = None,
             seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (token ids), ending with the first stop token if one came.

    stop_token_ids: defaults to the config's `eos_token_id`.
    """
    model = causal_model(model)
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BertJaxError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise BertJaxError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if stop_token_ids is None:
        stop_token_ids = (config.eos_token_id,)
    prompt_length = max(len(p) for p in prompts)
    total = prompt_length + max_new_tokens
    if total > config.max_sequence_length:
        raise BertJaxError(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) "
                           f"exceeds max_sequence_length={config.max_sequence_length} "
                           "in config.json")
    for p in prompts:
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise BertJaxError(
                f"prompt token ids must lie in [0, {config.vocab_size}) (vocab_size)")

    ids = np.full((len(prompts), prompt_length), config.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, prompt_length - len(p):] = p
        mask[row, prompt_length - len(p):] = 1
    tokens, lengths = _decode(model.module, config, max_new_tokens, sampling,
                              tuple(stop_token_ids))(model.params, ids, mask, jax.random.key(seed))
    return [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


@functools.lru_cache(maxsize=16)
def _decode(module, config: GptBertConfig, max_new_tokens: int, sampling: Sampling,
            stop_token_ids: tuple[int, ...]):
    """The compiled prefill + decode loop for one (model, length, sampling) setting."""
    stops = jnp.asarray(stop_token_ids, jnp.int32)

    def step(params, ids_BT, mask_BT, positions_BT, cache):
        out = module.apply({"params": params}, ids_BT, attention_mask=mask_BT,
                           position_ids=positions_BT, past_key_values=cache)
        return out.logits[:, -1], out.past_key_values

    @jax.jit
    def run(params, ids_BT, mask_BT, rng):
        batch = ids_BT.shape[0]
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        cache = init_cache(config, batch, ids_BT.shape[1] + max_new_tokens)
        logits_BV, cache = step(params, ids_BT, mask_BT, positions_BT, cache)
        state = dict(i=jnp.int32(0), logits=logits_BV, cache=cache, rng=rng,
                     position=positions_BT[:, -1], done=jnp.zeros(batch, bool),
                     lengths=jnp.zeros(batch, jnp.int32),
                     tokens=jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32))

        def body(s):
            rng, key = jax.random.split(s["rng"])
            token_B = jnp.where(s["done"], config.pad_token_id,
                                _choose(s["logits"], key, sampling))
            lengths = s["lengths"] + (~s["done"]).astype(jnp.int32)
            done = s["done"] | jnp.isin(token_B, stops)
            position = s["position"] + 1
            logits_BV, cache = step(params, token_B[:, None], jnp.ones((batch, 1), jnp.int32),
                                    position[:, None], s["cache"])
            return dict(i=s["i"] + 1, logits=logits_BV, cache=cache, rng=rng, position=position,
                        done=done, lengths=lengths, tokens=s["tokens"].at[:, s["i"]].set(token_B))

        def keep_going(s):
            return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

        final = jax.lax.while_loop(keep_going, body, state)
        return final["tokens"], final["lengths"]

    return run


def _choose(logits_BV, key, sampling: Sampling):
    """The next token of every row, greedy or sampled."""
    if not sampling.do_sample:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth_best = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the best token).
        outside = jnp.cumsum(probs, axis=-1) - probs >= sampling.top_p
        threshold = jnp.min(jnp.where(outside, jnp.inf, sorted_desc), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)
