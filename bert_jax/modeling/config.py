"""Model configurations: frozen dataclasses that read and write HF `config.json`.

Architecture fields use each family's Hugging Face names, so a config round-trips unchanged;
keys that bert_jax does not use (e.g. `transformers_version`) are kept in `extra` and
written back. `dtype`, `param_dtype` and `attention_backend` (and a family's other runtime
fields) are choices of this run and never reach `config.json`.

`vocab_multiple` is one of them: the model then holds its vocabulary rows (word embeddings,
MLM decoder and bias) padded up to a multiple of it, so that a mesh's `tensor` axis divides
them (`sharding.vocab_multiple`). The padding rows are zeros, their logits are masked out of
every softmax and loss, and every output (and every file written) has `vocab_size` entries.
`allow_replication` is another: how the params may be laid out on a mesh
(`sharding.param_shardings`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from bert_jax.errors import BertJaxError
from bert_jax.files import read_json

ATTENTION_BACKENDS = ("reference", "jax", "cudnn", "splash")
# Activation checkpointing of each layer: keep nothing ("full"), keep matmul outputs ("dots").
REMAT_POLICIES = ("none", "full", "dots")
_LABEL_KEYS = ("id2label", "label2id", "num_labels")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What every family shares: task head, labels, runtime choices and HF (de)serialisation."""

    HEADS: ClassVar[tuple[str, ...]] = ()
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "attention_backend",
                                                 "remat", "scan_layers", "vocab_multiple",
                                                 "allow_replication", "extra")
    # The config field of the attention-probabilities dropout (named in error messages).
    ATTENTION_DROPOUT_FIELD: ClassVar[str] = ""

    architectures: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None  # HF id2label, in id order
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # Runtime only.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_backend: str = "reference"
    remat: str = "none"
    scan_layers: bool = False  # one nn.scan over the layers (modeling/scan.py): faster compiles
    vocab_multiple: int = 1  # vocabulary rows padded to a multiple of this (1: none)
    # Params a mesh does not divide are replicated instead of refused (sharding.MeshConfig's)
    allow_replication: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise BertJaxError(f"attention_backend {self.attention_backend!r} is not one of "
                               f"{ATTENTION_BACKENDS}")
        if self.remat not in REMAT_POLICIES:
            raise BertJaxError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if (isinstance(self.vocab_multiple, bool) or not isinstance(self.vocab_multiple, int)
                or self.vocab_multiple < 1):
            raise BertJaxError(f"vocab_multiple must be a positive integer, got "
                               f"{self.vocab_multiple!r}")
        if self.attention_backend == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise BertJaxError(f"attention_backend 'cudnn' needs dtype bfloat16 or float16, "
                               f"not {self.dtype}")
        _ = self.head  # raises on an `architectures` this family does not have

    @property
    def class_prefix(self) -> str:
        raise NotImplementedError

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rows the model holds: `vocab_size` rounded up to `vocab_multiple`."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def with_vocab_multiple(self, multiple: int):
        """The same model holding its vocabulary padded to a multiple of `multiple` (1: none);
        e.g. `config.with_vocab_multiple(sharding.vocab_multiple(mesh))` before training."""
        return dataclasses.replace(self, vocab_multiple=multiple)

    @property
    def layers_per_scan_step(self) -> int:
        """How many consecutive layers one `nn.scan` step runs (`scan_layers`)."""
        return 1

    @property
    def scannable(self) -> bool:
        """Whether the layer stack splits into `nn.scan` steps of `layers_per_scan_step`."""
        return True

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def head(self) -> str:
        """The task head named by `architectures[0]`, e.g. "ForMaskedLM" or "Model"."""
        arch, prefix = self.architecture, self.class_prefix
        if arch.startswith(prefix) and arch[len(prefix):] in self.HEADS:
            return arch[len(prefix):]
        known = ", ".join(prefix + h for h in self.HEADS)
        raise BertJaxError(f"config.json: architecture {arch!r} is not supported for this model "
                           f"family (known: {known})")

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 2

    def with_head(self, head: str, num_labels: int | None = None):
        """The same encoder with another task head (and optionally a new label count)."""
        changes: dict[str, Any] = {"architectures": (self.class_prefix + head,)}
        if num_labels is not None and num_labels != self.num_labels:
            changes["labels"] = tuple(f"LABEL_{i}" for i in range(num_labels))
        return dataclasses.replace(self, **changes)

    # HF config.json ---------------------------------------------------------------------------
    @classmethod
    def check_hf_dict(cls, hf: dict[str, Any]) -> None:
        """Family-specific refusals of a config.json, before any field is read."""

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime):
        cls.check_hf_dict(hf)
        names = {f.name for f in dataclasses.fields(cls)} - set(cls.RUNTIME_FIELDS) - {"labels"}
        kwargs: dict[str, Any] = {k: v for k, v in hf.items() if k in names}
        kwargs["architectures"] = tuple(hf.get("architectures") or (cls.default_architecture(hf),))
        if hf.get("id2label"):
            id2label = {int(k): v for k, v in hf["id2label"].items()}
            kwargs["labels"] = tuple(id2label[i] for i in range(len(id2label)))
        elif "num_labels" in hf:
            kwargs["labels"] = tuple(f"LABEL_{i}" for i in range(int(hf["num_labels"])))
        extra = {k: v for k, v in hf.items() if k not in names and k not in _LABEL_KEYS}
        return cls(**kwargs, extra=extra, **runtime)

    @classmethod
    def default_architecture(cls, hf: dict[str, Any]) -> str:
        raise NotImplementedError

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for field in dataclasses.fields(self):
            if field.name not in self.RUNTIME_FIELDS:
                out[field.name] = getattr(self, field.name)
        out["architectures"] = list(self.architectures)
        del out["labels"]
        if self.labels is not None:
            out["id2label"] = {str(i): label for i, label in enumerate(self.labels)}
            out["label2id"] = {label: i for i, label in enumerate(self.labels)}
        for optional in ("problem_type", "classifier_dropout"):  # None is transformers' default
            if out[optional] is None:
                del out[optional]
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | Path, **runtime):
        return cls.from_hf_dict(read_json(path), **runtime)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


# model_type -> where the LayerNorms sit (BERT: after each residual add; Megatron: before).
NORM_PLACEMENT = {"bert": "post", "megatron-bert": "pre"}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    HEADS: ClassVar[tuple[str, ...]] = (
        "Model", "ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction",
        "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
        "ForMultipleChoice")

    ATTENTION_DROPOUT_FIELD: ClassVar[str] = "attention_probs_dropout_prob"

    architectures: tuple[str, ...] = ("BertForMaskedLM",)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    model_type: str = "bert"

    def __post_init__(self):
        if self.model_type not in NORM_PLACEMENT:
            raise BertJaxError(
                f"config.json: model_type {self.model_type!r} is not a BERT family type "
                f"(expected one of {sorted(NORM_PLACEMENT)})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise BertJaxError(f"config.json: hidden_act {self.hidden_act!r} is not supported "
                               f"(supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise BertJaxError(f"config.json: hidden_size {self.hidden_size} is not a multiple of "
                               f"num_attention_heads {self.num_attention_heads}")
        super().__post_init__()

    @property
    def norm_placement(self) -> str:
        return NORM_PLACEMENT[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def class_prefix(self) -> str:
        return "MegatronBert" if self.model_type == "megatron-bert" else "Bert"

    @property
    def max_length(self) -> tuple[str, int]:
        """The config field that bounds the input length, and its value."""
        return "max_position_embeddings", self.max_position_embeddings

    @property
    def classifier_dropout_prob(self) -> float:
        if self.classifier_dropout is None:
            return self.hidden_dropout_prob
        return self.classifier_dropout

    @classmethod
    def check_hf_dict(cls, hf: dict[str, Any]) -> None:
        if hf.get("model_type") not in NORM_PLACEMENT:
            raise BertJaxError(
                f"config.json: model_type {hf.get('model_type')!r} is not a BERT family type "
                f"(expected one of {sorted(NORM_PLACEMENT)})"
            )
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise BertJaxError(f"config.json: position_embedding_type "
                               f"{hf['position_embedding_type']!r} is not supported "
                               f"(only 'absolute')")
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag):
                raise BertJaxError(f"config.json: {flag}=true is not supported (encoder only)")

    @classmethod
    def default_architecture(cls, hf: dict[str, Any]) -> str:
        return ("MegatronBert" if hf["model_type"] == "megatron-bert" else "Bert") + "Model"


BERT_PRESETS: dict[str, BertConfig] = {
    "bert-base-cased": BertConfig(vocab_size=28996),
    "bert-large-cased": BertConfig(vocab_size=28996, hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, intermediate_size=4096),
    "bert-base-multilingual-cased": BertConfig(vocab_size=119547),
    "bert-large-swedish-cased": BertConfig(
        model_type="megatron-bert", architectures=("MegatronBertForMaskedLM",), vocab_size=30592,
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=1024),
    "tiny": BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64),
}
