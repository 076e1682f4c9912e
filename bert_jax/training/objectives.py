"""What pretraining means for each model family: the head trained, the head exported, and the
Grain pipeline that feeds it.

BERT / Megatron: masked LM (+ NSP when `data.nsp`), batches from `bert_pipeline`.
GPT-BERT: the hybrid masked-next-token + causal objective (`GptBertForPreTraining`) on packed
rows from `gpt_bert_pipeline`, exported as `GptBertForMaskedLM` (same weights), which
NorBERT 4's Hub code loads.
With a `dp` recipe section, BERT's masked LM is trained with DP-SGD on `private_pipeline`'s
batches instead.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from bert_jax import sharding
from bert_jax.data.pipeline import PipelineIterator, bert_pipeline, gpt_bert_pipeline
from bert_jax.data.prepare import read_shards
from bert_jax.data.private_batches import PrivateBatches, mlm_examples, mlm_rows
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.training.privacy import DpPlan

# Config fields of special-token ids, and the tokens that fill them (BERT's or NorBERT's).
_SPECIAL_TOKENS = {"bos_token_id": ("<s>", "[CLS]"), "eos_token_id": ("</s>", "[SEP]"),
                   "unk_token_id": ("<unk>", "[UNK]"), "pad_token_id": ("<pad>", "[PAD]"),
                   "mask_token_id": ("<mask>", "[MASK]")}


def special_token_ids(config, tokenizer: Tokenizer) -> dict[str, int]:
    """A new model's special-token ids, taken from its tokenizer (a preset's defaults belong
    to another vocabulary); only for the fields the config has."""
    fields = {f.name for f in dataclasses.fields(config)}
    found = {}
    for field, tokens in _SPECIAL_TOKENS.items():
        ids = [tokenizer.backend.token_to_id(token) for token in tokens]
        ids = [i for i in ids if i is not None]
        if field in fields and ids:
            found[field] = ids[0]
    return found


def pretraining_head(config, nsp: bool) -> str:
    if isinstance(config, GptBertConfig):
        if nsp:
            raise BertJaxError("data.nsp: GPT-BERT has no next-sentence objective; set "
                               "data.nsp=false")
        return "ForPreTraining"
    return "ForPreTraining" if nsp else "ForMaskedLM"


def export_config(config):
    """The config a finished run is saved with (an architecture `transformers` knows)."""
    return config.with_head("ForMaskedLM") if isinstance(config, GptBertConfig) else config


def pretraining_pipeline(data, data_dir: str, config, tokenizer: Tokenizer,
                         seed: int) -> PipelineIterator:
    """This process's share of the batches for `data` (the recipe's data section)."""
    common = dict(seed=seed, global_batch_size=data.global_batch_size,
                  max_seq_length=data.max_seq_length, vocab_size=config.vocab_size,
                  process_index=jax.process_index(), process_count=jax.process_count())
    if tokenizer.mask_token_id is None:
        raise BertJaxError("the tokenizer has no mask token, which pretraining needs")
    if isinstance(config, GptBertConfig):
        return gpt_bert_pipeline(read_shards(data_dir), **common, bos_id=config.bos_token_id,
                                 pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id,
                                 masked_ratio=data.masked_ratio,
                                 mask_probability=data.mlm_probability,
                                 max_span_length=data.max_span_length)
    ids = {name: tokenizer.backend.token_to_id(token) for name, token in
           (("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]"))}
    if None in ids.values():
        raise BertJaxError("the tokenizer needs [CLS], [SEP] and [PAD] for BERT pretraining")
    return bert_pipeline(read_shards(data_dir), **common, **ids, mask_id=tokenizer.mask_token_id,
                         mlm_probability=data.mlm_probability,
                         max_predictions_per_seq=data.max_predictions_per_seq, nsp=data.nsp,
                         short_seq_prob=data.short_seq_prob,
                         whole_word_starts_fn=word_starts(tokenizer) if data.whole_word_masking
                         else None)


def private_pipeline(data, dp, config, tokenizer: Tokenizer, seed: int, steps: int,
                     mesh) -> tuple[PrivateBatches, DpPlan]:
    """DP-SGD's masked-LM batches and the privacy plan they are drawn by (`data.private_batches`):
    BERT / Megatron without NSP, whose examples would mix documents."""
    if isinstance(config, GptBertConfig) or data.nsp:
        raise BertJaxError("dp: DP-SGD pretraining is masked LM on BERT / Megatron models "
                           "(set data.nsp=false)")
    ids = {name: tokenizer.backend.token_to_id(token) for name, token in
           (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"))}
    if None in ids.values() or tokenizer.mask_token_id is None:
        raise BertJaxError("the tokenizer needs [CLS], [SEP], [PAD] and [MASK] for pretraining")
    examples = mlm_examples(read_shards(data.train), data.max_seq_length, ids["cls"], ids["sep"])
    plan = dp.plan(len(examples), data.global_batch_size, steps,
                   multiple_of=sharding.batch_split(mesh))
    rows = mlm_rows(examples, seed=seed, max_seq_length=data.max_seq_length,
                    vocab_size=config.vocab_size, pad_id=ids["pad"],
                    mask_id=tokenizer.mask_token_id, special_ids=tuple(ids.values()),
                    mlm_probability=data.mlm_probability)
    return PrivateBatches(plan, rows, seed=seed, process_index=jax.process_index(),
                          process_count=jax.process_count()), plan


def word_starts(tokenizer: Tokenizer):
    """ids -> True where a word starts. WordPiece marks continuations ("##ing"), SentencePiece
    marks starts ("\u2581the")."""
    vocab = tokenizer.backend.get_vocab()
    sentencepiece = any(token.startswith("\u2581") for token in vocab)
    starts = np.ones(max(vocab.values()) + 1, bool)
    for token, index in vocab.items():
        starts[index] = token.startswith("\u2581") if sentencepiece else not token.startswith("##")
    if starts.all():
        raise BertJaxError("data.whole_word_masking: the tokenizer marks no word pieces "
                           "(\"##\" or \"\u2581\"), so words cannot be told apart")
    return lambda ids: starts[ids]
