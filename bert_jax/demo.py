"""`bert-jax demo`: the whole conversion path on a tiny model, with nothing to download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bert_jax.convert.families import BERT
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.data.train_tokenizer import train_wordpiece
from bert_jax.inference.fill_mask import fill_mask
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel, from_pretrained

CORPUS = [
    "Paris is the capital of France.",
    "Oslo is the capital of Norway.",
    "Stockholm is the capital of Sweden.",
    "Copenhagen is the capital of Denmark.",
    "Berlin is the capital of Germany.",
    "The river flows through the city.",
    "She reads a book in the library.",
]


def run_demo(out: Path) -> None:
    tokenizer_dir = out / "tokenizer"
    train_wordpiece(CORPUS, tokenizer_dir, vocab_size=200, min_frequency=1, show_progress=False)
    vocab_size = load_tokenizer(tokenizer_dir).backend.get_vocab_size()
    config = preset("tiny", vocab_size=vocab_size)
    model = PretrainedModel(config, BERT.init_params(config, seed=0), tokenizer_dir)
    print(f"created {model!r}")

    hf, orbax, back = out / "hf", out / "orbax", out / "hf_roundtrip"
    model.save_pretrained(hf)
    from_pretrained(hf).save_pretrained(orbax, format="orbax")
    from_pretrained(orbax).save_pretrained(back)
    before, after = read_state_dict(hf), read_state_dict(back)
    identical = before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]) for k in before)
    print(f"HF {hf} -> Orbax {orbax} -> HF {back}: {len(before)} tensors, "
          f"{'bit-identical' if identical else 'DIFFERENT'}")
    if not identical:
        raise SystemExit(1)

    text = "Paris is the [MASK] of France."
    print(f"fill-mask on {text!r} (random weights, so the ranking is arbitrary):")
    for p in fill_mask(from_pretrained(back), load_tokenizer(back), text, top_k=5):
        print(f"  {p['score']:.4f}  {p['token_str']}")
