"""Dynamic masking for masked-LM pretraining, in NumPy on the host (never device ops).

Both functions take one sequence `[T]` or a batch `[B, T]` of token ids with a `special_mask`
of the same shape (True at [CLS]/[SEP]/[PAD] and other tokens never to be predicted) and a
`numpy.random.Generator`; the same generator state gives the same output. They return
`(masked_ids, labels)`: labels hold the original id at every chosen position and -100
elsewhere (the ignore index of `transformers` and of our losses). A chosen token is replaced
by `mask_token_id` 80% of the time, by a random id in `[random_token_low, vocab_size)` 10% of
the time, and kept 10% of the time (it still carries a label); the decision is made per token.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(input_ids, special_mask, rng: np.random.Generator, *, vocab_size: int,
                mask_token_id: int, mlm_probability: float = 0.15,
                max_predictions: int | None = None, whole_word_starts=None,
                random_token_low: int = 0):
    """BERT masking as in Google's `create_pretraining_data.py`, vectorised over the batch.

    Each sequence gets exactly `n = max(1, round(mlm_probability * c))` predictions, `c` being
    its number of non-special tokens (the original rounds the length including [CLS]/[SEP];
    ours excludes them so padding does not count), capped at `max_predictions` when given and
    0 when `c == 0`. Positions are taken in a random order, so the rate is `mlm_probability`
    up to rounding, like the per-token coin of `DataCollatorForLanguageModeling`.

    `whole_word_starts` (bool, True where a word starts, False on `##` continuations) switches
    to whole-word masking: words are taken in a random order until at least `n` tokens are
    chosen, all sub-tokens of a word together. The last word may go past `n` (never past
    `max_predictions`: a word that would is not taken, and the row stops there). The original
    instead skips words that overflow `n` and tries the next; ours stays vectorised, gives
    every row at least one word (unless that word alone exceeds `max_predictions`), and lands
    on average a fraction of a token above `n`.
    The 80/10/10 replacement stays per token, as in the original whole-word code (a chosen
    word may get [MASK] on one piece and keep another).
    """
    ids_BxT, special_BxT = _as_batch(input_ids, special_mask)
    B, T = ids_BxT.shape
    cand_BxT = ~special_BxT
    if whole_word_starts is None:
        start_BxT = cand_BxT
    else:
        starts = np.asarray(whole_word_starts, bool).reshape(B, T)
        prev_cand_BxT = np.pad(cand_BxT[:, :-1], ((0, 0), (1, 0)))
        start_BxT = cand_BxT & (starts | ~prev_cand_BxT)  # a word never spans a special token

    n_cand_B = cand_BxT.sum(axis=1)
    limit = T if max_predictions is None else max_predictions
    target_B = np.minimum(np.maximum(1, np.rint(n_cand_B * mlm_probability)), limit)

    # Each token points at its word's start; the word's length is kept at its start.
    word_BxT = np.maximum.accumulate(np.where(start_BxT, np.arange(T), 0), axis=1)
    flat_word = (np.arange(B)[:, None] * T + word_BxT)[cand_BxT]
    length_BxT = np.bincount(flat_word, minlength=B * T).reshape(B, T)
    # The words of each row in a random order (other positions last), and the number of
    # tokens of the row's earlier words in that order: a word is chosen while that is < n.
    order_BxT = np.argsort(np.where(start_BxT, rng.random((B, T)), 2.0), axis=1)
    len_O = np.take_along_axis(length_BxT, order_BxT, axis=1)
    before_O = np.cumsum(len_O, axis=1) - len_O
    take_O = (len_O > 0) & (before_O < target_B[:, None]) & (before_O + len_O <= limit)
    chosen_start_BxT = np.zeros((B, T), bool)
    np.put_along_axis(chosen_start_BxT, order_BxT, take_O, axis=1)
    chosen_BxT = cand_BxT & np.take_along_axis(chosen_start_BxT, word_BxT, axis=1)

    masked, labels = _replace(ids_BxT, chosen_BxT, rng, vocab_size, mask_token_id,
                              random_token_low)
    return masked.reshape(np.shape(input_ids)), labels.reshape(np.shape(input_ids))


def span_mask(input_ids, special_mask, rng: np.random.Generator, *, vocab_size: int,
              mask_token_id: int, mask_probability: float = 0.15, max_span_length: int = 3,
              random_token_low: int = 0):
    """Span masking for GPT-BERT's masked-next-token objective (NorBERT 4).

    Each row is walked as alternating gaps and spans: span lengths are uniform in
    `1..max_span_length`, gaps geometric (at least 1 token, so spans never touch) with the mean
    that makes the expected masked fraction `mask_probability` (at most
    E[span] / (E[span] + 1), i.e. 2/3 for spans of 1..3). Special positions inside a span are
    dropped from it, so the rate over non-special tokens stays near `mask_probability`.
    Replacement is the per-token 80/10/10 of `mask_tokens`. Labels are aligned with the input
    (unshifted); the GPT-BERT loss moves them one position left itself.
    """
    ids_BxT, special_BxT = _as_batch(input_ids, special_mask)
    B, T = ids_BxT.shape
    mean_span = (1 + max_span_length) / 2
    mean_gap = mean_span * (1 - mask_probability) / mask_probability
    if mean_gap < 1:
        raise ValueError(f"mask_probability={mask_probability} too high for spans of "
                         f"1..{max_span_length} separated by gaps")
    K = T // 2 + 1  # a gap and a span take >= 2 positions, so K of them cover any row
    gap_BxK = rng.geometric(1 / mean_gap, (B, K))
    span_BxK = rng.integers(1, max_span_length + 1, (B, K))
    end_BxK = np.cumsum(gap_BxK + span_BxK, axis=1)
    start_BxK = end_BxK - span_BxK
    # +1 at each span start, -1 after its end; a running sum marks the spans. Indices past the
    # row land in a spare column T that is dropped (starts and ends never collide otherwise).
    diff_Bx1T = np.zeros((B, T + 1), np.int8)
    rows_BxK = np.arange(B)[:, None]
    diff_Bx1T[rows_BxK, np.minimum(start_BxK, T)] = 1
    diff_Bx1T[rows_BxK, np.minimum(end_BxK, T)] = -1
    chosen_BxT = (np.cumsum(diff_Bx1T[:, :T], axis=1) > 0) & ~special_BxT

    masked, labels = _replace(ids_BxT, chosen_BxT, rng, vocab_size, mask_token_id,
                              random_token_low)
    return masked.reshape(np.shape(input_ids)), labels.reshape(np.shape(input_ids))


def masked_positions(labels_BT, max_predictions: int) -> np.ndarray:
    """`[B, max_predictions]` int32: each row's labelled positions in order, -1 in the slots
    left over (Google BERT's `masked_lm_positions`). The MLM head then runs on these positions
    only, not on all T (see `heads.at_positions`): at 15% masking, about 1/6 of its cost."""
    labelled_BT = np.asarray(labels_BT) != IGNORE_INDEX
    most = int(labelled_BT.sum(axis=1).max(initial=0))
    if most > max_predictions:
        raise ValueError(f"a row has {most} labelled tokens, more than max_predictions="
                         f"{max_predictions}")
    return positions_where(labelled_BT, max_predictions)


def positions_where(selected_BT, slots: int) -> np.ndarray:
    """`[B, slots]` int32: the positions of each row's True entries in order (the first
    `slots` of them), -1 in the slots left over."""
    selected_BT = np.asarray(selected_BT, bool)
    # Stable sort puts selected positions first, in order; the rest become -1.
    order_BT = np.argsort(~selected_BT, axis=1, kind="stable")[:, :slots]
    taken_BP = np.take_along_axis(selected_BT, order_BT, axis=1)
    return np.where(taken_BP, order_BT, -1).astype(np.int32)


def _as_batch(input_ids, special_mask):
    ids = np.asarray(input_ids)
    if ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {ids.shape}")
    special = np.asarray(special_mask, bool)
    if special.shape != ids.shape:
        raise ValueError(f"special_mask shape {special.shape} != input_ids shape {ids.shape}")
    return ids.reshape(-1, ids.shape[-1]), special.reshape(-1, ids.shape[-1])


def _replace(ids_BxT, chosen_BxT, rng, vocab_size, mask_token_id, random_token_low):
    """80% [MASK], 10% random id, 10% unchanged at the chosen positions; labels elsewhere -100."""
    u_BxT = rng.random(ids_BxT.shape)
    random_BxT = rng.integers(random_token_low, vocab_size, ids_BxT.shape, dtype=ids_BxT.dtype)
    masked = np.where(chosen_BxT & (u_BxT < 0.8), ids_BxT.dtype.type(mask_token_id), ids_BxT)
    masked = np.where(chosen_BxT & (u_BxT >= 0.8) & (u_BxT < 0.9), random_BxT, masked)
    labels = ids_BxT.astype(np.result_type(ids_BxT.dtype, np.int32))
    labels[~chosen_BxT] = IGNORE_INDEX
    return masked, labels
