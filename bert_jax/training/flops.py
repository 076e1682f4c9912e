"""Model FLOPs utilisation: the training FLOPs a token costs, and what the chip could do.

A training token costs 6 N (forward 2 N, backward 4 N, N = every parameter, the tied output
embedding included, as its matmul is done once per token) plus attention's two T-long
matmuls per layer (QK^T and AV: forward 4 T d, backward twice that), d = heads x head size.
That is the usual MFU convention (PaLM, MaxText): rematerialised work is not counted, so MFU
is the useful fraction. GPT-BERT's local layers count their window span, not the whole row.
"""

from __future__ import annotations

import jax

from bert_jax.modeling.gpt_bert_config import GptBertConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, by `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def training_flops_per_token(config, num_params: int, seq_len: int) -> float:
    """FLOPs of one token's forward and backward pass (see the module docstring)."""
    if isinstance(config, GptBertConfig):
        heads_dim = config.num_attention_heads * (config.query_key_head_size
                                                  + config.value_head_size) / 2
        spans = [min(seq_len, 2 * config.window(layer) + 1) for layer in range(config.num_layers)]
    else:
        heads_dim, spans = config.hidden_size, [seq_len] * config.num_hidden_layers
    return 6 * num_params + 12 * heads_dim * sum(spans)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The chip's dense bf16 peak, or None when unknown (CPUs: no MFU is reported)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None
