"""Public datasets (GLUE, CoNLL-2003, ...) from `tensorflow-datasets`, by random access.

`tfds.data_source` reads a prepared dataset's ArrayRecord files (preparing it on first use)
and needs no TensorFlow. Rows come back as the same `Record`s as local files, with class ids
turned into their names, so one path builds the label map and checks the labels.
tensorflow-datasets is optional (`pip install tensorflow-datasets`). The trainer does not
call this module itself: `load_classification` and `load_token_classification` do.
"""

from __future__ import annotations

import importlib

import numpy as np

from bert_jax.data.finetune_files import Record
from bert_jax.errors import BertJaxError


def read_tfds(name: str, split: str, data_dir: str | None = None
              ) -> tuple[list[Record], dict[str, list[str]]]:
    """The rows of `name`'s `split` (any tfds split spec, e.g. `train[:10%]`) and, for each
    class-label column (or sequence of class labels), its class names in id order."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise BertJaxError(f"dataset {name!r}: reading tensorflow-datasets sources needs "
                           "`pip install tensorflow-datasets`") from None
    # tfds registers its older builders (GLUE, CoNLL-2003, IMDB, ...) only when their package
    # is imported, which tfds itself does lazily, and never without TensorFlow installed.
    importlib.import_module("tensorflow_datasets.text")
    try:
        features = tfds.builder(name, data_dir=data_dir).info.features
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise BertJaxError(f"tensorflow-datasets has no dataset {name!r}") from None
    names = {column: _class_names(feature) for column, feature in features.items()}
    names = {column: classes for column, classes in names.items() if classes is not None}
    records = []
    for index in range(len(source)):
        where = f"{name}[{split}] example {index}"
        values = {column: _python(value) for column, value in source[index].items()}
        for column, classes in names.items():
            values[column] = _names(values[column], classes, f"{where}, column {column!r}")
        records.append(Record(values, where))
    if not records:
        raise BertJaxError(f"{name}[{split}]: no examples")
    return records, names


def _class_names(feature) -> list[str] | None:
    feature = getattr(feature, "feature", feature)  # a Sequence of class labels
    return list(feature.names) if hasattr(feature, "names") else None


def _python(value):
    """NumPy arrays, scalars and byte strings of a tfds example -> lists, numbers, str."""
    if isinstance(value, np.ndarray) and value.ndim:
        return [_python(item) for item in value]
    value = value.item() if isinstance(value, (np.ndarray, np.generic)) else value
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _names(ids, classes: list[str], where: str):
    """Class ids -> names; -1 (the label of GLUE's test splits) and others out of range fail."""
    if isinstance(ids, list):
        return [_names(i, classes, where) for i in ids]
    if not 0 <= ids < len(classes):
        raise BertJaxError(f"{where}: class id {ids} is not one of the {len(classes)} classes "
                           "(test splits of GLUE have no labels, -1)")
    return classes[ids]
