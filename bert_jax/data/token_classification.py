"""Token classification (NER) data: CoNLL column files, JSON Lines or a tensorflow-datasets
source, tags converted to the model's scheme and aligned to sub-tokens.

The finetune trainer calls `load_token_classification(config, tokenizer)` and feeds the
splits of the `TaskData` it returns to `batching.batches`; `TaskData.labels` becomes the
model's `id2label`. The label map is the config's, else the tfds class names of the tag
column (when the tags keep their scheme), else the training split's tags sorted (as
transformers' run_ner). Alignment is run_ner's too: a word's first sub-token gets its label,
its other sub-tokens -100, or with `label_all_tokens` the word's label with B-X made I-X.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bert_jax.data.batching import Features, TaskData
from bert_jax.data.encoding import encode
from bert_jax.data.finetune_files import Record, TaggedSentence, read_conll, read_table
from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.tagging import convert_tags
from bert_jax.data.tfds_source import read_tfds
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError


@dataclasses.dataclass(frozen=True)
class TokenClassificationData:
    """Where the sentences are, which columns hold tokens and tags, and the tag schemes."""

    train: str | None = None  # a CoNLL file (.jsonl: JSON Lines), or a split when `tfds` is set
    eval: str | None = None
    tfds: str | None = None  # a tensorflow-datasets name, e.g. conll2003
    tfds_data_dir: str | None = None
    token_column: int | str | None = None  # CoNLL: an index (default 0); else a key ("tokens")
    tag_column: int | str | None = None  # CoNLL: an index (default -1, the last); else ("ner")
    tag_scheme: str = "IOB2"  # the data's: IOB1, IOB2 or BIOES
    # the model's: IOB2 or BIOES; default: BIOES if `labels` has S-/E- labels, else IOB2
    label_scheme: str | None = None
    labels: list[str] | None = None  # the label map, in id order
    label_all_tokens: bool = False
    max_seq_length: int = 128
    # train on packed rows of max_seq_length (data/packing.py); train.batch_size then counts rows
    pack: bool = False


def load_token_classification(config: TokenClassificationData, tokenizer: Tokenizer) -> TaskData:
    """Both splits read, their tags converted, checked against one label map and aligned."""
    if config.train is None and config.labels is None:
        raise BertJaxError("data: without a train split, give the label map as `labels`")
    train, classes = read_sentences(config, config.train) if config.train else ([], None)
    labels = tuple(config.labels or classes or sorted({tag for s in train for tag in s.tags}))

    def encode(sentences: list[TaggedSentence]) -> Features:
        return encode_token_classification(sentences, tokenizer, labels, config.max_seq_length,
                                           config.label_all_tokens)

    return TaskData(encode(train) if config.train else None,
                    encode(read_sentences(config, config.eval)[0]) if config.eval else None,
                    labels)


def read_sentences(config: TokenClassificationData, split: str
                   ) -> tuple[list[TaggedSentence], list[str] | None]:
    """The sentences of `split` with tags in the model's scheme, and the tag column's tfds
    class names when the tags keep their scheme (else None)."""
    token_column, tag_column = config.token_column, config.tag_column
    classes = None
    if config.tfds:
        records, names = read_tfds(config.tfds, split, config.tfds_data_dir)
        classes = names.get(tag_column or "ner")
        sentences = _sentences(records, token_column or "tokens", tag_column or "ner")
    elif split.endswith(".jsonl"):
        sentences = _sentences(read_table(split), token_column or "tokens", tag_column or "ner")
    else:
        token_column = 0 if token_column is None else token_column
        tag_column = -1 if tag_column is None else tag_column
        if not (isinstance(token_column, int) and isinstance(tag_column, int)):
            raise BertJaxError(f"{split}: CoNLL columns are numbered: token_column and "
                               "tag_column must be indices")
        sentences = read_conll(split, token_column, tag_column)
    label_scheme = config.label_scheme or (
        "BIOES" if any(label[:2] in ("S-", "E-") for label in config.labels or ()) else "IOB2")
    if config.tag_scheme != label_scheme:
        classes = None
    return [dataclasses.replace(s, tags=convert_tags(s.tags, config.tag_scheme, label_scheme,
                                                     s.where))
            for s in sentences], classes


def encode_token_classification(sentences: list[TaggedSentence], tokenizer: Tokenizer,
                                labels: tuple[str, ...], max_seq_length: int,
                                label_all_tokens: bool = False) -> Features:
    """Sub-token ids of each pre-split sentence (truncated to `max_seq_length`, as
    transformers' `is_split_into_words=True, truncation=True`) and their aligned label ids."""
    encodings = encode(tokenizer, [s.tokens for s in sentences], max_length=max_seq_length,
                       is_split_into_words=True)
    ids = {name: i for i, name in enumerate(labels)}
    inside = [ids.get("I-" + name[2:], i) if name.startswith("B-") else i
              for i, name in enumerate(labels)]  # B-X -> I-X for later sub-tokens
    aligned = []
    for sentence, encoding in zip(sentences, encodings):
        word_labels = []
        for index, tag in enumerate(sentence.tags):
            if tag not in ids:
                raise BertJaxError(f"{sentence.where(index)}: label {tag!r} is not in the label "
                                   f"map ({', '.join(labels)})")
            word_labels.append(ids[tag])
        row, previous = [], None
        for word in encoding.word_ids:
            row.append(IGNORE_INDEX if word is None
                       else word_labels[word] if word != previous
                       else inside[word_labels[word]] if label_all_tokens else IGNORE_INDEX)
            previous = word
        aligned.append(np.array(row, np.int32))
    return Features.from_encodings(encodings, aligned)


def _sentences(records: list[Record], token_column: str, tag_column: str) -> list[TaggedSentence]:
    sentences = []
    for record in records:
        sentence = TaggedSentence(record.get(token_column), record.get(tag_column), record.where)
        for column, values in ((token_column, sentence.tokens), (tag_column, sentence.tags)):
            if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
                raise BertJaxError(f"{record.where}: column {column!r} is not a list of strings")
        if len(sentence.tokens) != len(sentence.tags):
            raise BertJaxError(f"{record.where}: {len(sentence.tokens)} tokens but "
                               f"{len(sentence.tags)} tags")
        sentences.append(sentence)
    return sentences
