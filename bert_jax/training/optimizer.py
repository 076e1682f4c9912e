"""The optimizer: optax AdamW (or LAMB), warmup + decay schedule, masked weight decay and
global-norm clipping, as BERT was trained. (Gradient accumulation happens in the train step,
`train_step.accumulated_loss_and_grads`: one update per step, on the whole batch.)

`build_optimizer(config)` is the only thing a train step needs; the rest is public so tests
and recipes can check the pieces (the schedule to log the learning rate, the mask to audit
which tensors decay).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

from bert_jax.errors import BertJaxError

OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("linear", "cosine", "constant")

# Leaf names that never decay, whatever their rank: biases (BERT's per-head attention biases
# are 2-D), LayerNorm / RMSNorm scales and GPT-BERT's per-head q_scale / k_scale (2-D), and
# GPT-BERT's layer-mixing `lambdas`.
_NO_DECAY_SUFFIXES = ("bias", "scale", "lambdas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """What every recipe's `optimizer:` section holds; the schedule's length is each kind's
    own (`OptimizerConfig`'s counts, fine-tuning's `FinetuneOptimizer` derives them).

    `eps=1e-6` is BERT's (Google's `AdamWeightDecayOptimizer` and the HF recipes), not
    optax's/PyTorch's 1e-8 default.
    """

    name: str = "adamw"  # "adamw" | "lamb"
    learning_rate: float
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (after warmup)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float | None = None  # global-norm clipping of the (accumulated) gradient
    # Micro-batches each step's batch is split into (same update, less activation memory)
    accumulation_steps: int = 1

    def __post_init__(self):
        """Every setting checked when the recipe is read, each error naming its field."""
        if self.name not in OPTIMIZERS:
            _bad(self, "name", f"is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            _bad(self, "schedule", f"is not one of {', '.join(SCHEDULES)}")
        if _number(self, "learning_rate") <= 0:
            _bad(self, "learning_rate", "must be > 0")
        for field in ("b1", "b2"):
            if not 0 <= _number(self, field) < 1:
                _bad(self, field, "must be in [0, 1)")
        if _number(self, "eps") <= 0:
            _bad(self, "eps", "must be > 0")
        if _number(self, "weight_decay") < 0:
            _bad(self, "weight_decay", "must be >= 0")
        if self.clip_norm is not None and _number(self, "clip_norm") <= 0:
            _bad(self, "clip_norm", "must be > 0 (or None for no clipping)")
        if _integer(self, "accumulation_steps") < 1:
            _bad(self, "accumulation_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(OptimizerSettings):
    """What `build_optimizer` builds: `warmup_steps` and `total_steps` count optimizer
    updates, one per train step (whatever `accumulation_steps`)."""

    warmup_steps: int
    total_steps: int

    def __post_init__(self):
        super().__post_init__()
        if _integer(self, "total_steps") < 1:
            _bad(self, "total_steps", "must be >= 1")
        if _integer(self, "warmup_steps") < 0:
            _bad(self, "warmup_steps", "must be >= 0")
        if self.schedule == "constant":
            if self.warmup_steps > self.total_steps:
                _bad(self, "warmup_steps", f"must be <= total_steps ({self.total_steps})")
        elif self.warmup_steps >= self.total_steps:
            _bad(self, "warmup_steps", f"must be < total_steps ({self.total_steps}) to leave "
                                       f"steps for the {self.schedule} decay")


def _bad(section, field: str, why: str):
    raise BertJaxError(f"optimizer: {field}={getattr(section, field)!r} {why}")


def _number(section, field: str) -> float:
    value = getattr(section, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _bad(section, field, "is not a finite number")
    return value


def _integer(section, field: str) -> int:
    value = getattr(section, field)
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(section, field, "is not an integer")
    return value


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then linear or cosine decay to 0 at
    `total_steps` (held at 0 after), or constant lr.

    Step 0 (the first update) gets lr 0, exactly like `transformers`'
    `get_linear_schedule_with_warmup`, so runs compare step for step.
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    decay_steps = config.total_steps - warmup
    if config.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _leaf_name(path) -> str:
    key = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: a leaf of rank >= 2 whose name does not end in
    "bias", "scale" or "lambdas".

    So kernels (`kernel`, GPT-BERT's `query`/`key`/`linear`/`gate`) and embedding tables
    decay; biases, LayerNorm scale/bias, GPT-BERT's (1+scale) input scales, q_scale/k_scale
    and lambdas do not. Rank alone is not enough (BERT's attention biases and GPT-BERT's
    q_scale/k_scale are 2-D) and name alone is not either (the rank test keeps any future
    1-D parameter out by default), hence both. Works on arrays and on `jax.ShapeDtypeStruct`s.
    """
    def decays(path, leaf) -> bool:
        name = _leaf_name(path)
        return len(leaf.shape) >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if set) -> adamw / lamb with the schedule and `decay_mask`.
    It sees the whole batch's gradient, accumulated or not, so clipping is the large
    batch's."""
    schedule = learning_rate_schedule(config)
    make = optax.adamw if config.name == "adamw" else optax.lamb
    step = make(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                weight_decay=config.weight_decay, mask=decay_mask)
    if config.clip_norm is not None:
        step = optax.chain(optax.clip_by_global_norm(config.clip_norm), step)
    return step
