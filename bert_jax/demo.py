"""`bert-jax demo`: the whole conversion path on a tiny model, with nothing to download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing

from bert_jax.convert.weight_files import read_state_dict
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.families import BERT
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
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


def build_tokenizer(out_dir: Path) -> None:
    """A cased WordPiece tokenizer trained on CORPUS, saved as transformers would."""
    tokenizer = BertWordPieceTokenizer(lowercase=False)
    tokenizer.train_from_iterator(CORPUS, vocab_size=200, min_frequency=1,
                                  special_tokens=list(SPECIAL_TOKENS.values()))
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = BertProcessing((sep, tokenizer.token_to_id(sep)),
                                              (cls, tokenizer.token_to_id(cls)))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": False, **SPECIAL_TOKENS}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def run_demo(out: Path) -> None:
    tokenizer_dir = out / "tokenizer"
    build_tokenizer(tokenizer_dir)
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
