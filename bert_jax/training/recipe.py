"""Training recipes: a YAML file of sections, overridable with `--set section.key=value`.

Every key is checked against the recipe's dataclasses (`Recipe` below for pretraining,
`finetune.FinetuneRecipe` for fine-tuning), so a misspelt key is an error naming it rather
than a silently ignored setting. A section typed as a union of dataclasses is the member
that its `task` key names (each member's `task` default), e.g. the fine-tuning data. The
sections both kinds have hold their common keys in one base (`ModelSection`, `TrainSection`,
`optimizer.OptimizerSettings`) that each kind extends with its own keys and defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from bert_jax.errors import BertJaxError
from bert_jax.sharding import MeshConfig
from bert_jax.training.optimizer import OptimizerConfig, OptimizerSettings
from bert_jax.training.privacy import DpConfig

logger = logging.getLogger("bert_jax")

# Default of `train.compilation_cache_dir` (pretraining and fine-tuning): compiled programs kept
# across runs (restarts, resumes, the next run of the same shapes) by JAX's persistent
# compilation cache; null turns it off. Local or gs://. Under $XDG_CACHE_HOME where it is set.
COMPILATION_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "bert_jax",
                                     "jax_cache")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """How the model runs: what every recipe's `model:` section holds."""

    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False  # one nn.scan over the layers: compile time independent of depth

    def runtime(self) -> dict[str, Any]:
        """These settings, as `from_pretrained` and the presets take them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSection)}


@dataclasses.dataclass(frozen=True)
class PretrainModel(ModelSection):
    preset: str | None = None  # a bert_jax preset name, for training from scratch
    init_from: str | None = None  # an HF or Orbax directory, for continued pretraining
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""  # a prepare-data output directory
    eval: str | None = None
    max_seq_length: int = 128
    global_batch_size: int = 32
    mlm_probability: float = 0.15  # GPT-BERT: the masked rows' masking rate
    max_predictions_per_seq: int | None = None
    whole_word_masking: bool = False
    nsp: bool = True
    short_seq_prob: float = 0.1
    masked_ratio: float = 0.5  # GPT-BERT: the share of masked (vs causal) rows
    max_span_length: int = 3  # GPT-BERT: masked spans are 1..this many tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    """What every recipe's `train:` section holds; each kind gives its own defaults to the
    fields without one here."""

    output_dir: str
    seed: int
    log_every: int = 10
    keep_checkpoints: int
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    compilation_cache_dir: str | None = COMPILATION_CACHE_DIR


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainOptimizer(OptimizerSettings):
    """Pretraining's `optimizer:` section. The schedule counts optimizer updates, one per
    train step: `total_steps` is `train.steps` unless given. A longer schedule is a run
    stopped part-way on purpose (resumed later with more `train.steps`), and says so in the
    log; a shorter one would train on at learning rate 0, and is refused."""

    learning_rate: float = 1e-4
    warmup_steps: int = 100
    total_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        OptimizerConfig(**self._shared(), warmup_steps=self.warmup_steps,  # checks them
                        total_steps=self.total_steps or self.warmup_steps + 1)

    def _shared(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerSettings)}

    def optimizer_config(self, steps: int) -> OptimizerConfig:
        total = steps if self.total_steps is None else self.total_steps
        if total < steps:
            raise BertJaxError(f"optimizer.total_steps={total} is less than train.steps={steps}:"
                               f" the schedule has one update per step and would end at "
                               f"learning rate 0; leave total_steps out (it follows "
                               f"train.steps) or make it at least train.steps")
        if total > steps:
            logger.warning("train.steps=%d stops the run part-way through its %d-step schedule "
                           "(optimizer.total_steps); --resume with more train.steps continues it",
                           steps, total)
        return OptimizerConfig(**self._shared(), warmup_steps=self.warmup_steps,
                               total_steps=total)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainTrain(TrainSection):
    output_dir: str = "runs/pretrain"
    seed: int = 0
    keep_checkpoints: int = 3
    steps: int = 1000
    eval_every: int = 200
    eval_batches: int = 10
    save_every: int = 200
    record_example_ids: bool = False  # audit: example_ids.process<i>.jsonl, ids fed per step


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: PretrainModel = PretrainModel()
    data: DataSection = DataSection()
    optimizer: PretrainOptimizer = PretrainOptimizer()
    mesh: MeshConfig = MeshConfig()
    train: PretrainTrain = PretrainTrain()
    dp: DpConfig | None = None  # DP-SGD (masked LM only, no NSP): see training/privacy.py


def load_recipe(path: str | Path | None, overrides: list[str] = (), recipe_cls: type = Recipe):
    """The `recipe_cls` recipe in `path` (YAML) with `section.key=value` overrides (values
    parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BertJaxError(f"{path}: cannot read the recipe ({err})") from None
        if not isinstance(raw, dict):
            raise BertJaxError(f"{path}: a recipe is a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise BertJaxError(f"--set {item!r}: expected section.key=value")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    return _build(recipe_cls, raw, "recipe")


def _build(cls, raw: dict[str, Any], where: str):
    """Instantiate dataclass `cls` from `raw`, recursing into dataclass-typed fields."""
    if not isinstance(raw, dict):
        raise BertJaxError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BertJaxError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        section = _section_class(hints[name], value, f"{where}.{name}")
        if section is not None:
            default = getattr(cls(), name) if _has_defaults(cls) else None
            base = dataclasses.asdict(default) if type(default) is section else {}
            value = _build(section, {**base, **value} if isinstance(value, dict) else value,
                           f"{where}.{name}")
        elif isinstance(value, str) and float in typing.get_args(hints[name]) + (hints[name],):
            value = _number(value, f"{where}.{name}")  # YAML reads 5e-4 (no dot) as a string
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise BertJaxError(f"{where}: {err}") from None


def _section_class(hint, raw, where: str) -> type | None:
    """The dataclass a value of type `hint` is built as (None: a plain value)."""
    if dataclasses.is_dataclass(hint):
        return hint
    members = [m for m in typing.get_args(hint) if dataclasses.is_dataclass(m)]
    if not members:
        return None
    if not isinstance(raw, dict) or len(members) == 1:
        return members[0]  # an optional section, or one whose build names the problem
    by_task = {m().task: m for m in members}
    task = raw.get("task", members[0]().task)
    if task not in by_task:
        raise BertJaxError(f"{where}.task: {task!r} is not one of {', '.join(by_task)}")
    return by_task[task]


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BertJaxError(f"{where}: {text!r} is not a number") from None


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))
