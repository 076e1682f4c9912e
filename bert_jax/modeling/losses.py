"""Losses as `transformers` computes them, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def cross_entropy(logits_BxC, labels_B, ignore_index: int = IGNORE_INDEX,
                  count: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the labels that are not `ignore_index` (any leading shape).

    `count`: divide by this instead of the number of labels here: a larger batch's, so that
    the losses of its micro-batches add up to its own (gradient accumulation)."""
    logits = logits_BxC.astype(jnp.float32).reshape(-1, logits_BxC.shape[-1])
    labels = labels_B.reshape(-1)
    valid = labels != ignore_index
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / (labelled(labels, ignore_index)
                                                          if count is None else count)


def labelled(labels, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """How many labels count (are not `ignore_index`): what `cross_entropy` divides by."""
    return jnp.sum(labels != ignore_index)


def sequence_classification_loss(logits_BC, labels, problem_type: str | None) -> jax.Array:
    """Regression (MSE), single-label (CE) or multi-label (BCE), chosen as `transformers` does."""
    num_labels = logits_BC.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits_BC.astype(jnp.float32)
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean((logits.squeeze(-1) - labels.squeeze()) ** 2)
        return jnp.mean((logits - labels) ** 2)
    if problem_type == "single_label_classification":
        return cross_entropy(logits, labels)
    if problem_type == "multi_label_classification":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    raise ValueError(f"unknown problem_type {problem_type!r}")


def span_loss(start_logits_BT, end_logits_BT, start_positions_B, end_positions_B) -> jax.Array:
    """QA loss: positions outside the sequence are clamped to T and ignored."""
    length = start_logits_BT.shape[-1]
    start = jnp.clip(start_positions_B, 0, length)
    end = jnp.clip(end_positions_B, 0, length)
    return (cross_entropy(start_logits_BT, start, ignore_index=length)
            + cross_entropy(end_logits_BT, end, ignore_index=length)) / 2
