"""`bert-jax convert --verify`: do two model directories compute the same function?

Both run on one random batch (fixed seed, token types, the second row half padding) and every
output and hidden state is compared on the real tokens. A Hugging Face directory runs in
`transformers` (PyTorch, fp32, eager attention), the other side in bert_jax, so the check covers
the weights and our model's parity at once. Both sides run in bert_jax where transformers
cannot run the model: GPT-BERT (transformers has it only as the checkpoint's remote code, which
bert_jax never executes), or torch/transformers not installed (then the check still catches a
mis-converted tensor, but not a difference between the two libraries).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from bert_jax.convert import hf_dir
from bert_jax.convert.families import BERT, family_of_config
from bert_jax.pretrained import from_pretrained

FP32_TOLERANCE = 1e-4
# Weights rounded to bf16/fp16 (e.g. `convert --dtype bf16`) move each output by up to about 1%
# of its scale (max |value|; 0.8% on the logits of a 24-layer BERT-large); a wrong tensor moves
# it by about its whole scale.
ROUNDED_RTOL = 5e-2
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Verification:
    reference: str  # what ran the source, e.g. "transformers BertForMaskedLM (PyTorch)"
    candidate: str  # what ran the conversion
    diffs: dict[str, float]  # output name -> max abs difference on real tokens
    tolerances: dict[str, float]  # output name -> the largest difference accepted
    note: str = ""  # why both sides ran in bert_jax, if they did

    @property
    def worst(self) -> str:
        """The output closest to (or furthest beyond) its tolerance."""
        return max(self.diffs, key=lambda k: self.diffs[k] / max(self.tolerances[k], 1e-30))

    @property
    def ok(self) -> bool:
        return all(self.diffs[name] <= self.tolerances[name] for name in self.diffs)

    def summary(self) -> str:
        lines = [f"verify: {self.reference} on the source vs {self.candidate} on the conversion"]
        if self.note:
            lines.append(f"  ({self.note})")
        lines += [f"  {name:<20} max abs diff {diff:<10.3g} tolerance {self.tolerances[name]:.3g}"
                  for name, diff in self.diffs.items()]
        worst = self.worst
        lines.append(f"{'OK' if self.ok else 'FAILED'}: max abs diff "
                     f"{max(self.diffs.values()):.3g}; closest to its tolerance: {worst} "
                     f"({self.diffs[worst]:.3g} of {self.tolerances[worst]:.3g})")
        return "\n".join(lines)

    def failure(self) -> str:
        worst = self.worst
        return (f"{worst} differs by {self.diffs[worst]:.3g}, above the tolerance "
                f"{self.tolerances[worst]:.3g} ({self.reference} on the source vs "
                f"{self.candidate} on the conversion)")


def verify(src: str | Path, dst: str | Path, *, tolerance: float | None = None,
           seed: int = 0) -> Verification:
    """Compare the model in `src` with its conversion in `dst` (any mix of HF and Orbax)."""
    src, dst = Path(src), Path(dst)
    src_config, dst_config = hf_dir.load_config(src), hf_dir.load_config(dst)
    inputs = random_inputs(dst_config, seed)
    note = _why_not_transformers(dst_config, hf_dir.is_hf_dir(src) or hf_dir.is_hf_dir(dst))
    if note:
        reference, candidate = "bert_jax", "bert_jax"
        model = from_pretrained(dst)
        out = _run_bert_jax(model, inputs)
        model.params = from_pretrained(src).params  # the same compiled forward, other weights
        ref_out = _run_bert_jax(model, inputs)
    elif hf_dir.is_hf_dir(src):
        reference, candidate = f"transformers {dst_config.architecture} (PyTorch)", "bert_jax"
        ref_out = _run_transformers(src, dst_config, inputs)
        out = _run_bert_jax(from_pretrained(dst), inputs)
    else:
        reference, candidate = "bert_jax", f"transformers {dst_config.architecture} (PyTorch)"
        ref_out = _run_bert_jax(from_pretrained(src), inputs)
        out = _run_transformers(dst, dst_config, inputs)

    mask = inputs["attention_mask"]
    ref_out = {name: _real_tokens(ref, mask) for name, ref in ref_out.items() if name in out}
    diffs = {name: float(np.abs(_real_tokens(out[name], mask) - ref).max())
             for name, ref in ref_out.items()}
    rounded = (_ITEMSIZE.get(hf_dir.declared_dtype(dst_config), 4)
               < _ITEMSIZE.get(hf_dir.declared_dtype(src_config), 4))
    if tolerance is not None:
        tolerances = dict.fromkeys(diffs, tolerance)
    elif rounded:
        tolerances = {name: ROUNDED_RTOL * max(float(np.abs(ref).max()), 1.0)
                      for name, ref in ref_out.items()}
    else:
        tolerances = dict.fromkeys(diffs, FP32_TOLERANCE)
    return Verification(reference, candidate, diffs, tolerances, note)


def random_inputs(config, seed: int = 0, batch: int = 2, length: int = 16) -> dict[str, np.ndarray]:
    """Random token ids [B, T] ([B, 2, T] for multiple choice), the second row half padding."""
    rng = np.random.default_rng(seed)
    tokens = min(length, config.max_length[1])
    shape = (batch, 2, tokens) if config.head == "ForMultipleChoice" else (batch, tokens)
    mask = np.ones(shape, np.int64)
    mask[1, ..., tokens // 2:] = 0
    inputs = {"input_ids": rng.integers(0, config.vocab_size, shape), "attention_mask": mask}
    if getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = rng.integers(0, config.type_vocab_size, shape) * mask
    return inputs


def _why_not_transformers(config, either_is_hf: bool) -> str:
    if family_of_config(config) is not BERT:
        return ("GPT-BERT runs in transformers only as the checkpoint's remote code, which "
                "bert_jax never executes: both sides ran in bert_jax")
    if not either_is_hf:
        return "neither side is a Hugging Face directory: both sides ran in bert_jax"
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: both sides ran in bert_jax "
                f"(pip install torch transformers to compare with transformers)")
    return ""


def _run_bert_jax(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = model(**inputs, output_hidden_states=True)
    return _arrays({field.name: getattr(out, field.name) for field in dataclasses.fields(out)})


def _run_transformers(model_dir: Path, config,
                      inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch
    import transformers
    from transformers.utils import logging

    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its loading bar, among our output
    try:
        model = getattr(transformers, config.architecture).from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v) for k, v in inputs.items()}, output_hidden_states=True)
    return _arrays({k: (tuple(t.numpy() for t in v) if isinstance(v, tuple) else v.numpy())
                    for k, v in out.items()})


def _arrays(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Float outputs by name, hidden states as hidden_states[i]; loss and caches left out."""
    out = {}
    for name, value in outputs.items():
        if name == "hidden_states" and value is not None:
            out.update({f"hidden_states[{i}]": np.asarray(h) for i, h in enumerate(value)})
        elif name not in ("loss", "past_key_values") and value is not None:
            out[name] = np.asarray(value)
    return out


def _real_tokens(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`x` at the non-padded positions when it has the token axes of `mask` ([B, T] or,
    flattened for multiple choice, [B*C, T]); all of `x` otherwise."""
    for m in (mask, mask.reshape(-1, mask.shape[-1])):
        if x.shape[: m.ndim] == m.shape:
            return x[m == 1]
    return x
