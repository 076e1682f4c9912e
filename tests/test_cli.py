"""The `bert-jax` command: fill-mask against the transformers pipeline, convert, demo, and
bad input (one-line error, non-zero exit, no partial output)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import VOCAB, make_hf_model, save_hf_model, transformers

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.files import copy_tokenizer_files
from bert_jax.inference.fill_mask import fill_mask

WORDS = ("the a of is was in on and capital city river country paris oslo france norway "
         "sweden berlin he she it big small old new").split()


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    """A tiny BertForMaskedLM with a WordPiece tokenizer, both saved by transformers."""
    path = tmp_path_factory.mktemp("mlm")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + WORDS
    vocab += [f"##{w}" for w in ("s", "ed", "ing")]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    (path / "vocab.txt").unlink()
    save_hf_model(make_hf_model("bert", "ForMaskedLM", vocab_size=len(vocab)), path)
    return path


def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("text", ["Paris is the [MASK] of France.",
                                  "Oslo [MASK] the capital of [MASK]!"])
def test_fill_mask_matches_pipeline(mlm_dir, text):
    """Same tokens, token strings, sequences and scores (1e-4) as pipeline("fill-mask")."""
    pipe = transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu")
    expected = pipe(text, top_k=5)
    ours = fill_mask(bert_jax.from_pretrained(mlm_dir), load_tokenizer(mlm_dir), text, top_k=5)
    if isinstance(expected[0], dict):
        expected, ours = [expected], [ours]
    assert len(ours) == len(expected)
    for exp_mask, our_mask in zip(expected, ours):
        assert [p["token"] for p in our_mask] == [p["token"] for p in exp_mask]
        assert [p["token_str"] for p in our_mask] == [p["token_str"] for p in exp_mask]
        assert [p["sequence"] for p in our_mask] == [p["sequence"] for p in exp_mask]
        np.testing.assert_allclose([p["score"] for p in our_mask],
                                   [p["score"] for p in exp_mask], atol=1e-4)


def test_fill_mask_cli_json_equals_api(mlm_dir):
    text = "Paris is the [MASK] of France."
    result = run_cli("fill-mask", "--model", str(mlm_dir), "--top-k", "3", "--json", text)
    assert result.returncode == 0, result.stderr
    api = fill_mask(bert_jax.from_pretrained(mlm_dir), load_tokenizer(mlm_dir), text, top_k=3)
    cli = json.loads(result.stdout)
    assert [p["token"] for p in cli] == [p["token"] for p in api]
    np.testing.assert_allclose([p["score"] for p in cli], [p["score"] for p in api], atol=1e-6)


def test_convert_both_ways_bit_identical(mlm_dir, tmp_path):
    """HF -> Orbax -> HF through the CLI; tokenizer files travel along."""
    assert main(["convert", str(mlm_dir), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "params").is_dir()
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    original, back = read_state_dict(mlm_dir), read_state_dict(tmp_path / "hf")
    assert original.keys() == back.keys()
    assert all(np.array_equal(original[k], back[k]) for k in original)
    # The converted directory loads in stock transformers.
    transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")


def test_convert_sharded(mlm_dir, tmp_path):
    assert main(["convert", str(mlm_dir), str(tmp_path / "sharded"), "--to", "hf",
                 "--max-shard-size", "20KB"]) == 0
    shards = list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    original, back = read_state_dict(mlm_dir), read_state_dict(tmp_path / "sharded")
    assert all(np.array_equal(original[k], back[k]) for k in original)


def assert_clean_failure(result, *needles, leftovers=()):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert-jax: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]
    for path in leftovers:
        assert not path.exists()
        assert not list(path.parent.glob(f".{path.name}.tmp-*"))


def test_error_text_without_mask(mlm_dir):
    assert_clean_failure(run_cli("fill-mask", "--model", str(mlm_dir), "no mask here"),
                         "no mask token [MASK]")


def test_error_input_too_long(mlm_dir):
    text = " ".join(["the"] * 80) + " [MASK]"
    assert_clean_failure(run_cli("fill-mask", "--model", str(mlm_dir), text),
                         "max_position_embeddings=64")


def test_error_fill_mask_without_mlm_head(tmp_path, mlm_dir):
    path = save_hf_model(make_hf_model("bert", "ForSequenceClassification"), tmp_path / "cls")
    copy_tokenizer_files(mlm_dir, tmp_path / "cls")
    assert_clean_failure(run_cli("fill-mask", "--model", path, "a [MASK]"), "masked-LM head")


def test_error_unknown_model_type(mlm_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((mlm_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    (src / "model.safetensors").write_bytes((mlm_dir / "model.safetensors").read_bytes())
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out")),
                         "config.json", "'roberta'", leftovers=[tmp_path / "out"])


def test_error_unknown_architecture(mlm_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((mlm_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"]}))
    (src / "model.safetensors").write_bytes((mlm_dir / "model.safetensors").read_bytes())
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out")),
                         "BertLMHeadModel", leftovers=[tmp_path / "out"])


def test_error_missing_tensor_leaves_no_output(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src"
    save_hf_model(make_hf_model("bert", "ForMaskedLM"), src)
    tensors = read_state_dict(src)
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out")),
                         "bert.encoder.layer.1.output.dense.weight", "model.safetensors",
                         leftovers=[tmp_path / "out"])


def test_error_wrong_shape(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src"
    save_hf_model(make_hf_model("bert", "ForMaskedLM"), src)
    tensors = read_state_dict(src)
    tensors["bert.embeddings.word_embeddings.weight"] = np.zeros((VOCAB + 1, 32), np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf"),
                         "bert.embeddings.word_embeddings.weight", "(100, 32)", "(99, 32)",
                         leftovers=[tmp_path / "out"])


def test_error_truncated_safetensors(tmp_path):
    src = tmp_path / "src"
    save_hf_model(make_hf_model("bert", "ForMaskedLM"), src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out")),
                         "model.safetensors", "corrupt or truncated", leftovers=[tmp_path / "out"])


def test_error_no_weights(tmp_path, mlm_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((mlm_dir / "config.json").read_text())
    assert_clean_failure(run_cli("convert", str(src), str(tmp_path / "out")), str(src),
                         leftovers=[tmp_path / "out"])
    assert_clean_failure(run_cli("fill-mask", "--model", str(src), "a [MASK]"), "no model found")


def test_error_existing_destination(mlm_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_clean_failure(run_cli("convert", str(mlm_dir), str(tmp_path / "out")), "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_help_on_every_command():
    for args in ([], ["convert"], ["fill-mask"], ["demo"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage: bert-jax" in result.stdout


def test_demo_end_to_end(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "bit-identical" in result.stdout
    transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "demo" / "hf")


@pytest.mark.parametrize("lowercase", [False, True])
def test_train_tokenizer_loads_in_transformers(tmp_path, lowercase):
    """A trained WordPiece tokenizer encodes as transformers' AutoTokenizer does with it."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Sentence number {i} about Oslo and Bergen." for i in range(200)))
    args = ["train-tokenizer", str(text), "--out", str(tmp_path / "tok"), "--vocab-size", "120"]
    assert main(args + (["--lowercase"] if lowercase else [])) == 0
    ours = load_tokenizer(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    sample = "Oslo is a City near Bergen."
    assert ours.encode(sample) == theirs(sample)["input_ids"]
    assert ours.encode(sample)[0] == ours.backend.token_to_id("[CLS]")
    assert ("oslo" in theirs.tokenize(sample)) == lowercase
    assert (tmp_path / "tok" / "vocab.txt").is_file()


def test_train_tokenizer_bad_input(tmp_path):
    result = run_cli("train-tokenizer", str(tmp_path / "missing.txt"), "--out",
                     str(tmp_path / "tok"))
    assert_clean_failure(result, "missing.txt", leftovers=[tmp_path / "tok"])
