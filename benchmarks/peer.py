"""The peer side of a benchmark row: Hugging Face `transformers` PyTorch models holding the
exact weights bert_jax runs (loaded from the HF directory bert_jax saved), on CUDA when
there is one, else on the CPU.

Implementations: "eager" and "sdpa" (`attn_implementation`), and "compile" (sdpa under
`torch.compile`). bf16 inference casts the model to bf16 (as `dtype=torch.bfloat16` does);
bf16 training keeps fp32 weights under `torch.autocast`, the usual mixed-precision recipe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

IMPLEMENTATIONS = ("eager", "sdpa", "compile")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(model_dir: Path, implementation: str, dtype: str, *, train: bool = False,
         gpt_bert_code: Path | None = None):
    """The MLM model saved in `model_dir`, ready to run (compiled for "compile").

    GPT-BERT (NorBERT 4) has no class in `transformers`: its modeling code is the Hub's
    remote code, which is used only from a local copy (`gpt_bert_code`, a directory with
    modeling_gptbert.py and configuration_gptbert.py), never downloaded.
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    kwargs = {}
    config = json.loads((model_dir / "config.json").read_text())
    if config["architectures"][0].startswith("GptBert"):
        if gpt_bert_code is None:
            raise RuntimeError("NorBERT 4's PyTorch code is Hub remote code (modeling_gptbert.py), "
                               "not available offline: pass --gpt-bert-code DIR")
        _use_local_code(model_dir, gpt_bert_code)
        kwargs["trust_remote_code"] = True
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" and not train else torch.float32
    model = transformers.AutoModelForMaskedLM.from_pretrained(
        model_dir, dtype=torch_dtype,
        attn_implementation="eager" if implementation == "eager" else "sdpa", **kwargs)
    model = model.to(device()).train(train)
    return torch.compile(model) if implementation == "compile" else model


def _use_local_code(model_dir: Path, code_dir: Path) -> None:
    """Point config.json's auto_map at modules copied next to it."""
    for source in code_dir.glob("*.py"):
        shutil.copy(source, model_dir / source.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {k: v.split("--")[-1] for k, v in config["auto_map"].items()}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def _tensors(arrays: dict[str, np.ndarray]):
    import torch

    return {k: torch.as_tensor(np.asarray(v, np.int64), device=device()) for k, v in arrays.items()}


def logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(**_tensors(inputs)).logits.float().cpu().numpy()


def forward(model, inputs: dict[str, np.ndarray]):
    """() -> one MLM forward on device-resident inputs, synchronised."""
    import torch

    tensors = _tensors(inputs)

    def run():
        with torch.inference_mode():
            model(**tensors)
        sync()

    return run


def padded_batches(model, rows: list[np.ndarray], batch_size: int, pad_id: int):
    """() -> top-1 predictions of every row: batches in input order, each padded to its
    longest row (what a `transformers` pipeline with `batch_size` does)."""
    import torch

    batches = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        length = max(len(r) for r in chunk)
        ids = np.full((len(chunk), length), pad_id, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        batches.append({"input_ids": ids, "attention_mask": mask})

    def run():
        with torch.inference_mode():
            return [model(**_tensors(b)).logits.argmax(-1).cpu() for b in batches]

    return run


def train_step(model, batch: dict[str, np.ndarray], dtype: str):
    """() -> loss of one MLM train step: forward + backward + AdamW as the HF Trainer's
    default (fused AdamW, weight decay 0.01 on matrices only, eps 1e-6 as BERT)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.999), eps=1e-6, fused=True)
    tensors = _tensors(batch)

    def run():
        with torch.autocast(device(), torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(**tensors).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    """Peak CUDA bytes allocated since the last reset; None on the CPU (not measured)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
