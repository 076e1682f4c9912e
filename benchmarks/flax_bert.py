"""bert_jax against the Flax BERT that `transformers` shipped until v4.57 (v5 removed it) and
HF PyTorch (sdpa), on the same weights and inputs in one run: MLM inference forward, fp32.

Flax BERT needs transformers 4.57, so this runs in an environment of its own that sees the
installed bert_jax (the suite's `benchmarks.run` needs transformers 5):

    python -m venv --system-site-packages /tmp/hf457
    /tmp/hf457/bin/pip install "transformers==4.57.1" "huggingface_hub<1.0" "tokenizers<0.23"
    /tmp/hf457/bin/python -m benchmarks.flax_bert [--model bert-base-cased] [--batch 8]
                                                   [--seq 128] [--rounds 3]

Both JAX sides run jitted (Flax BERT's own `__call__` inside `jax.jit`, as its users ran it).
The three are timed in turn, `--rounds` times, each a median of 5 calls after warm-up; the
table shows each one's best round, so that a noisy moment on shared cores hurts none of them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from benchmarks import ours, peer
from benchmarks.run import environment
from benchmarks.timing import timed
from bert_jax.convert.families import family_of_config
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel


def flax_forward(model_dir: Path, inputs: dict[str, np.ndarray]):
    """(forward, logits) of transformers' FlaxBertForMaskedLM holding the saved weights."""
    import transformers

    if not hasattr(transformers, "FlaxBertForMaskedLM"):
        raise SystemExit(f"transformers {transformers.__version__} has no Flax BERT: run this "
                         "with transformers 4.57 (see the module docstring)")
    model = transformers.FlaxBertForMaskedLM.from_pretrained(model_dir, from_pt=True)
    apply = jax.jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params).logits)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return (lambda: apply(model.params, ids, mask).block_until_ready(),
            np.asarray(apply(model.params, ids, mask)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base-cased", help="a BERT preset name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import transformers

    config = preset(args.model).with_head("ForMaskedLM")
    model = PretrainedModel(config, family_of_config(config).init_params(config))
    rng = np.random.default_rng(0)
    seq = min(args.seq, config.max_length[1])
    ids = rng.integers(5, config.vocab_size, (args.batch, seq)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp))
        flax_fn, flax_logits = flax_forward(Path(tmp), inputs)
        torch_model = peer.load(Path(tmp), "sdpa", "float32")
    ours_logits = np.asarray(model(**inputs).logits)
    torch_logits = peer.logits(torch_model, inputs)
    runs = {"bert_jax": ours.forward(model, inputs), "transformers Flax BERT": flax_fn,
            "HF PyTorch (sdpa)": peer.forward(torch_model, inputs)}
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):  # in turn, so that a slow moment does not hit one side only
        for name, fn in runs.items():
            seconds[name].append(timed(fn, warmup=2, iters=5))
    best = {name: min(times) for name, times in seconds.items()}

    tokens = ids.size
    print(f"# {args.model} MLM forward, {args.batch} x {seq}, fp32; "
          f"{environment()['machine']['processor']}, {jax.devices()[0].device_kind}; "
          f"jax {jax.__version__}, transformers "
          f"{transformers.__version__}; best of {args.rounds} rounds")
    print(f"max abs logits diff vs bert_jax: Flax {np.abs(flax_logits - ours_logits).max():.1e}, "
          f"PyTorch {np.abs(torch_logits - ours_logits).max():.1e}\n")
    print("| implementation | tokens/s | x HF PyTorch | x Flax BERT |\n|---|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {tokens / seconds:,.0f} | {best['HF PyTorch (sdpa)'] / seconds:.2f}x "
              f"| {best['transformers Flax BERT'] / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
