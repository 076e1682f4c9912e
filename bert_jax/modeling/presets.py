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
    return dataclasses.replace(PRESETS[name], **overrides)
