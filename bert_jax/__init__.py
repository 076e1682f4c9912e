"""bert_jax: BERT-family encoders in JAX/Flax with exact Hugging Face parity."""

from bert_jax.errors import BertJaxError
from bert_jax.modeling.config import PRESETS, BertConfig, preset
from bert_jax.pretrained import PretrainedModel, from_pretrained

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertJaxError", "PRESETS", "PretrainedModel", "from_pretrained", "preset"]
