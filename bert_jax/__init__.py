"""bert_jax: BERT-family encoders in JAX/Flax with exact Hugging Face parity."""

from bert_jax.errors import BertJaxError
from bert_jax.modeling.config import BertConfig
from bert_jax.modeling.gpt_bert_config import GptBertConfig
from bert_jax.modeling.presets import PRESETS, preset
from bert_jax.pretrained import PretrainedModel, from_pretrained
from bert_jax.version import __version__

__all__ = ["BertConfig", "GptBertConfig", "BertJaxError", "PRESETS", "PretrainedModel",
           "__version__", "from_pretrained", "preset"]
