"""bert_jax: BERT-family encoders in JAX/Flax with exact Hugging Face parity.

The public names are imported on first use, so that `import bert_jax.data...` and
`bert-jax --help` do not start JAX.
"""

import importlib

from bert_jax.errors import BertJaxError
from bert_jax.version import __version__

_PUBLIC = {
    "BertConfig": "bert_jax.modeling.config",
    "GptBertConfig": "bert_jax.modeling.gpt_bert_config",
    "PRESETS": "bert_jax.modeling.presets",
    "preset": "bert_jax.modeling.presets",
    "PretrainedModel": "bert_jax.pretrained",
    "from_pretrained": "bert_jax.pretrained",
}
__all__ = ["BertJaxError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bert_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
