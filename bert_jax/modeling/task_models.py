"""The task models every family shares, written once over the family's encoder.

A family subclasses `TaskModel` with only what its task models do their own way (`encode`,
`sequence_vector`, `classify`, `span_logits`, `mlm`); each of its task models is then a
`__call__` with the family's signature that hands its arguments to one method below. The
encoder inputs travel as the tuple of a task model's leading arguments, which is also the
order of the family encoder's leading arguments (GPT-BERT has no `token_type_ids`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn

from bert_jax.modeling import losses
from bert_jax.modeling.heads import segment_classification_loss
from bert_jax.modeling.layers import merge_choices
from bert_jax.modeling.outputs import BaseModelOutput, LogitsOutput, QuestionAnsweringOutput


class TaskModel(nn.Module):
    """A family's encoder under its name in the params tree, and the task heads on top."""

    config: Any
    lm_last_hidden_state: ClassVar[bool] = False  # LM outputs carry it (GPT-BERT's reference)

    # What a family does its own way -----------------------------------------------------------
    def encode(self, inputs: tuple, deterministic: bool, output_hidden_states: bool, *,
               pooled: bool = False, segment_ids=None, cls_positions=None) -> BaseModelOutput:
        """The encoder on `inputs`. `pooled`: `sequence_vector` will be read, at
        `cls_positions` on packed rows (BERT builds its pooler for it)."""
        raise NotImplementedError

    def sequence_vector(self, out: BaseModelOutput, cls_positions_BP):
        """What sequence classification and multiple choice classify: `[B, D]`, or one vector
        per packed segment `[B, P, D]`."""
        raise NotImplementedError

    def classify(self, x, num_outputs: int, deterministic: bool):
        """The classifier of sequence / token classification and multiple choice."""
        raise NotImplementedError

    def span_logits(self, x_BTD, deterministic: bool):
        """Question answering's start and end logits `[B, T, 2]`."""
        raise NotImplementedError

    def mlm(self, x_BTD, labels_BT, masked_positions_BP, deterministic: bool, count=None):
        """(masked-LM logits, their loss, the number of labels it is over); without labels
        the last two are None. `count` divides the loss instead of that number."""
        raise NotImplementedError

    # The task models --------------------------------------------------------------------------
    def base_model(self, inputs, deterministic, output_hidden_states) -> BaseModelOutput:
        """The encoder alone, under the name every task model shares its subtree by."""
        return self.encode(inputs, deterministic, output_hidden_states, pooled=True)

    def masked_lm(self, inputs, labels, masked_positions, deterministic, output_hidden_states,
                  loss_counts=None) -> LogitsOutput:
        """`loss_counts`: a larger batch's {"mlm": labels}, which the loss divides by."""
        out = self.encode(inputs, deterministic, output_hidden_states)
        logits, loss, count = self.mlm(out.last_hidden_state, labels, masked_positions,
                                       deterministic, None if loss_counts is None
                                       else loss_counts["mlm"])
        return LogitsOutput(logits, loss, out.hidden_states,
                            out.last_hidden_state if self.lm_last_hidden_state else None,
                            loss_counts=None if count is None else {"mlm": count})

    def sequence_classification(self, inputs, labels, deterministic, output_hidden_states,
                                segment_ids, cls_positions) -> LogitsOutput:
        """Single-label, multi-label or regression; on packed rows (`segment_ids`,
        `cls_positions`) one example per segment: logits `[B, P, C]`, labels `[B, P]`."""
        c = self.config
        out = self.encode(inputs, deterministic, output_hidden_states, pooled=True,
                          segment_ids=segment_ids, cls_positions=cls_positions)
        logits = self.classify(self.sequence_vector(out, cls_positions), c.num_labels,
                               deterministic)
        loss = None
        if labels is not None and cls_positions is not None:
            loss = segment_classification_loss(logits, labels, cls_positions, c.problem_type)
        elif labels is not None:
            loss = losses.sequence_classification_loss(logits, labels, c.problem_type)
        return LogitsOutput(logits, loss, out.hidden_states)

    def token_classification(self, inputs, labels, deterministic, output_hidden_states,
                             segment_ids) -> LogitsOutput:
        """Per-token logits; packed rows give `segment_ids` and per-segment `position_ids`."""
        out = self.encode(inputs, deterministic, output_hidden_states, segment_ids=segment_ids)
        logits = self.classify(out.last_hidden_state, self.config.num_labels, deterministic)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return LogitsOutput(logits, loss, out.hidden_states)

    def question_answering(self, inputs, start_positions, end_positions, deterministic,
                           output_hidden_states) -> QuestionAnsweringOutput:
        out = self.encode(inputs, deterministic, output_hidden_states)
        logits_BT2 = self.span_logits(out.last_hidden_state, deterministic)
        start_logits, end_logits = logits_BT2[..., 0], logits_BT2[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(start_logits, end_logits, loss, out.hidden_states)

    def multiple_choice(self, inputs, labels, deterministic,
                        output_hidden_states) -> LogitsOutput:
        """Inputs are [B, C, T]; each choice is scored from its sequence vector."""
        num_choices = inputs[0].shape[1]
        out = self.encode(tuple(merge_choices(x) for x in inputs), deterministic,
                          output_hidden_states, pooled=True)
        logits = self.classify(self.sequence_vector(out, None), 1, deterministic)
        logits = logits.reshape(-1, num_choices)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return LogitsOutput(logits, loss, out.hidden_states)
