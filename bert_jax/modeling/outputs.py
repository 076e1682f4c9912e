"""Model outputs with the field names of `transformers`, as pytrees (they leave `jax.jit`)."""

from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class BaseModelOutput:
    last_hidden_state: Array
    pooler_output: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    past_key_values: dict | None = None  # GPT-BERT decoding cache


@struct.dataclass
class PreTrainingOutput:
    prediction_logits: Array
    seq_relationship_logits: Array
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    loss_counts: dict | None = None  # what the loss divides by (see `losses.cross_entropy`)


@struct.dataclass
class LogitsOutput:
    """Masked / causal LM, next sentence, sequence / token classification, multiple choice.

    `last_hidden_state` is filled by the GPT-BERT LM heads, as its reference returns it.
    """

    logits: Array
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    last_hidden_state: Array | None = None
    past_key_values: dict | None = None
    loss_counts: dict | None = None  # of the masked / causal LM losses


@struct.dataclass
class QuestionAnsweringOutput:
    start_logits: Array
    end_logits: Array
    loss: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
