"""Named model configs of every family: `preset("bert-base-cased", dtype="bfloat16")`."""

from __future__ import annotations

import dataclasses

from bert_jax.errors import BertJaxError
from bert_jax.modeling.config import BERT_PRESETS
from bert_jax.modeling.gpt_bert_config import GPT_BERT_PRESETS

PRESETS = {**BERT_PRESETS, **GPT_BERT_PRESETS}


def preset(name: str, **overrides):
    """A named preset with fields replaced, e.g. `preset("tiny", architectures=(...,))`."""
    if name not in PRESETS:
        raise BertJaxError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    fields = {f.name for f in dataclasses.fields(PRESETS[name])}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BertJaxError(f"preset {name!r} ({type(PRESETS[name]).__name__}) has no field "
                           f"{unknown[0]!r}")
    return dataclasses.replace(PRESETS[name], **overrides)
