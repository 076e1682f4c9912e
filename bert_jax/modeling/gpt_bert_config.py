"""GPT-BERT (NorBERT 4) configuration, read and written with the keys of its `config.json`.

NorBERT 4's config has no `model_type` (the Hub code is remote code); the family is known
from `architectures` (`GptBert*`). `window_rule` is a runtime choice: "exclusive" keeps key j
for query i iff |i - j| < w (as trained, and the FlashAttention path), "inclusive" iff
|i - j| <= w (the reference's CPU path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from bert_jax.errors import BertJaxError
from bert_jax.modeling.config import ModelConfig

# The Hub code that `auto_map` points to when a config has none of its own.
HUB_CODE_REPO = "ltg/norbert4-base"
_AUTO_CLASSES = {
    "AutoConfig": "configuration_gptbert.GptBertConfig",
    "AutoModel": "modeling_gptbert.GptBertModel",
    "AutoModelForMaskedLM": "modeling_gptbert.GptBertForMaskedLM",
    "AutoModelForCausalLM": "modeling_gptbert.GptBertForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gptbert.GptBertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_gptbert.GptBertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_gptbert.GptBertForQuestionAnswering",
    "AutoModelForMultipleChoice": "modeling_gptbert.GptBertForMultipleChoice",
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_attention_heads", "query_key_head_size", "value_head_size",
                 "max_sequence_length", "local_window_length", "global_window_length",
                 "local_global_ratio", "layer_norm_eps")
LOCAL_THETA, GLOBAL_THETA = 10_000.0, 160_000.0  # the Hub code ignores `rope_theta`


@dataclasses.dataclass(frozen=True)
class GptBertConfig(ModelConfig):
    HEADS: ClassVar[tuple[str, ...]] = (
        "Model", "ForMaskedLM", "ForCausalLM", "ForSequenceClassification",
        "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice", "ForPreTraining")
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ModelConfig.RUNTIME_FIELDS + ("window_rule",)
    ATTENTION_DROPOUT_FIELD: ClassVar[str] = "attention_dropout"

    architectures: tuple[str, ...] = ("GptBertForMaskedLM",)
    vocab_size: int = 51200
    hidden_size: int = 640
    intermediate_size: int = 1664
    num_layers: int = 24
    num_attention_heads: int = 10
    query_key_head_size: int = 64
    value_head_size: int = 64
    max_sequence_length: int = 16384
    local_window_length: int = 256
    global_window_length: int = 8192
    local_global_ratio: int = 4
    layer_norm_eps: float = 1e-7
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = 0.2
    unk_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    mask_token_id: int = 4
    window_rule: str = "exclusive"

    def __post_init__(self):
        if self.window_rule not in ("exclusive", "inclusive"):
            raise BertJaxError(f"window_rule {self.window_rule!r} is not 'exclusive' or "
                               f"'inclusive'")
        if self.scan_layers and not self.scannable:
            raise BertJaxError(f"scan_layers=true needs num_layers ({self.num_layers}) to be a "
                               f"multiple of local_global_ratio ({self.local_global_ratio}): "
                               f"each scan step runs local layers and the global one after "
                               f"them; leave scan_layers false")
        super().__post_init__()

    @property
    def class_prefix(self) -> str:
        return "GptBert"

    @property
    def max_length(self) -> tuple[str, int]:
        return "max_sequence_length", self.max_sequence_length

    @property
    def is_causal(self) -> bool:
        return self.head == "ForCausalLM"

    @property
    def layers_per_scan_step(self) -> int:
        """A group of local layers and the global one after them: layer j of every group has
        the same window and RoPE theta, so the groups are one program."""
        return self.local_global_ratio

    @property
    def scannable(self) -> bool:
        return self.num_layers % self.local_global_ratio == 0

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.local_global_ratio == 0

    def rope_theta(self, layer: int) -> float:
        return GLOBAL_THETA if self.is_global(layer) else LOCAL_THETA

    def window(self, layer: int) -> int:
        """How far a key may be from its query, in positions, under `window_rule`."""
        w = self.global_window_length if self.is_global(layer) else self.local_window_length
        return w - 1 if self.window_rule == "exclusive" else w

    @classmethod
    def check_hf_dict(cls, hf: dict[str, Any]) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in hf]
        if missing:
            raise BertJaxError(f"config.json: missing key {missing[0]!r} needed by GPT-BERT"
                               + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))

    @classmethod
    def default_architecture(cls, hf: dict[str, Any]) -> str:
        return "GptBertModel"

    def to_hf_dict(self) -> dict[str, Any]:
        """NorBERT 4's keys, with an `auto_map` so the Hub code (trust_remote_code) loads it."""
        out = super().to_hf_dict()
        out.setdefault("auto_map", {k: f"{HUB_CODE_REPO}--{v}" for k, v in _AUTO_CLASSES.items()})
        return out


GPT_BERT_PRESETS: dict[str, GptBertConfig] = {
    # Sizes of ltg/norbert4-*: base read from its config.json, the others inferred from the
    # published parameter counts (ARCHITECTURES.md 1.2).
    "norbert4-xsmall": GptBertConfig(hidden_size=192, num_layers=16, num_attention_heads=3,
                                     intermediate_size=512),
    "norbert4-small": GptBertConfig(hidden_size=320, num_layers=20, num_attention_heads=5,
                                    intermediate_size=832),
    "norbert4-base": GptBertConfig(),
    "norbert4-large": GptBertConfig(hidden_size=960, num_layers=28, num_attention_heads=15,
                                    intermediate_size=2560),
    "norbert4-xlarge": GptBertConfig(hidden_size=1536, num_layers=32, num_attention_heads=24,
                                     intermediate_size=4096),
    "norbert4-tiny": GptBertConfig(vocab_size=256, hidden_size=64, num_layers=4,
                                   num_attention_heads=2, query_key_head_size=32,
                                   value_head_size=32, intermediate_size=96,
                                   max_sequence_length=256, local_window_length=8,
                                   global_window_length=24),
}
