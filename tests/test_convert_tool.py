"""`bert-jax convert` (sharding, --dtype, --verify) and `bert-jax inspect`, against what
`transformers` writes, loads and reports for the same checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import NORBERT4_TINY, make_hf_model, save_hf_model, torch, transformers
from safetensors.numpy import save_file

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.orbax_dir import params_metadata
from bert_jax.convert.weight_files import SAFETENSORS_INDEX, read_state_dict
from bert_jax.tools import verify as verify_module
from bert_jax.tools.convert import convert
from bert_jax.tools.inspect import inspect_dir
from bert_jax.tools.verify import random_inputs, verify

PREFIX = {"bert": "Bert", "megatron-bert": "MegatronBert"}


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.dtype.itemsize}")


def assert_same_tensors(expected_dir, actual_dir) -> None:
    expected, actual = read_state_dict(Path(expected_dir)), read_state_dict(Path(actual_dir))
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        np.testing.assert_array_equal(_bits(actual[key]), _bits(tensor), err_msg=key)


def assert_one_line_error(capsys, *needles) -> None:
    """What the command wrote to stderr (since the last `capsys.readouterr()`): one line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert-jax: error:"), lines
    for needle in needles:
        assert needle in lines[0]


# Sharded round trip ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
def test_sharded_checkpoint_round_trip(tmp_path, model_type):
    """transformers' own sharded save -> Orbax -> HF with the same shard size: the same
    tensors bit for bit, the same shard files and the same index (weight map and metadata)."""
    model = make_hf_model(model_type, "ForMaskedLM")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back"),
                 "--max-shard-size", "20KB", "--quiet"]) == 0

    assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / SAFETENSORS_INDEX).read_text()) == index
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "back").glob("model-*.safetensors")) == shards


def test_max_shard_size_needs_hf_output(tmp_path, hf_dir, capsys):
    _, path = hf_dir()
    capsys.readouterr()
    assert main(["convert", path, str(tmp_path / "out"), "--max-shard-size", "1MB"]) == 1
    assert_one_line_error(capsys, "--max-shard-size")
    assert not (tmp_path / "out").exists()


def test_orbax_dir_that_does_not_fit_its_config(tmp_path, hf_dir, capsys):
    """An Orbax dir whose config.json was edited: converting or loading it names the param
    whose shape differs (or that the checkpoint lacks), and writes nothing."""
    _, path = hf_dir()
    assert main(["convert", path, str(tmp_path / "orbax"), "--quiet"]) == 0
    config_path = tmp_path / "orbax" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    capsys.readouterr()

    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 1
    assert_one_line_error(capsys, "does not fit config.json", "word_embeddings.embedding has shape")
    assert not (tmp_path / "back").exists()
    stored_shape = rf"\({config['vocab_size']}, "
    with pytest.raises(bert_jax.BertJaxError, match=f"does not fit config.json: .* {stored_shape}"):
        bert_jax.from_pretrained(tmp_path / "orbax")

    config_path.write_text(json.dumps({**config, "architectures": ["BertForPreTraining"]}))
    with pytest.raises(bert_jax.BertJaxError,
                       match="bert.pooler.dense.bias is not in the checkpoint"):
        bert_jax.from_pretrained(tmp_path / "orbax")


# --dtype ------------------------------------------------------------------------------------

def test_dtype_bf16_loads_in_transformers(tmp_path):
    """--dtype bf16: bf16 tensors equal to torch's own cast, config.json says bfloat16, and
    transformers loads the model in bf16. Through Orbax the result is the same file."""
    model = make_hf_model("bert", "ForMaskedLM")
    path = save_hf_model(model, tmp_path / "hf")
    assert main(["convert", path, str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for key, tensor in loaded.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor.view(torch.int16), expected[key].view(torch.int16)), key

    assert main(["convert", path, str(tmp_path / "orbax"), "--dtype", "bf16"]) == 0
    assert {dtype for _, dtype in params_metadata(tmp_path / "orbax").values()} == {"bfloat16"}
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    assert_same_tensors(tmp_path / "bf16", tmp_path / "back")


def test_dtype_fp32_from_bf16(tmp_path):
    """--dtype fp32 widens a bf16 checkpoint exactly."""
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM").to(torch.bfloat16), tmp_path / "hf")
    assert main(["convert", path, str(tmp_path / "fp32"), "--to", "hf", "--dtype", "fp32"]) == 0
    original, widened = read_state_dict(Path(path)), read_state_dict(tmp_path / "fp32")
    for key, tensor in original.items():
        assert widened[key].dtype == np.float32, key
        np.testing.assert_array_equal(widened[key], tensor.astype(np.float32), err_msg=key)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "fp32")
    assert loaded.dtype == torch.float32


# --verify -----------------------------------------------------------------------------------

def _torch_logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def test_verify_reports_the_difference(tmp_path, capsys):
    """The printed logits difference is the one between transformers on the source and
    bert_jax on the conversion, for the same random batch."""
    model = make_hf_model("bert", "ForSequenceClassification")
    path = save_hf_model(model, tmp_path / "hf")
    capsys.readouterr()
    assert main(["convert", path, str(tmp_path / "orbax"), "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "transformers BertForSequenceClassification (PyTorch)" in out and "OK:" in out

    converted = bert_jax.from_pretrained(tmp_path / "orbax")
    inputs = random_inputs(converted.config)
    expected = np.abs(np.asarray(converted(**inputs).logits) - _torch_logits(model, inputs)).max()
    printed = float(re.search(r"logits +max abs diff (\S+)", out).group(1))
    assert printed == pytest.approx(float(expected), rel=1e-2) and 0 < printed < 1e-4


def test_verify_detects_a_corrupted_conversion(tmp_path, capsys):
    """An MLM bias off by 0.01 in the converted directory shows as a 0.01 logits difference
    and fails; through the CLI (--tolerance) DST is then not written."""
    model, path = make_hf_model("bert", "ForMaskedLM"), tmp_path / "hf"
    save_hf_model(model, path)
    tensors = read_state_dict(path)
    tensors["cls.predictions.bias"] = tensors["cls.predictions.bias"] + np.float32(0.01)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})

    result = verify(path, tmp_path / "bad")
    assert not result.ok and result.worst == "logits"
    assert result.diffs["logits"] == pytest.approx(0.01, abs=1e-5)
    assert "FAILED" in result.summary()

    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "out"), "--verify", "--tolerance", "0",
                 "--quiet"]) == 1
    assert_one_line_error(capsys, "not written", "--verify failed")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_verify_without_torch_compares_bert_jax_on_both_sides(tmp_path, monkeypatch):
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path / "hf")
    real_find_spec = verify_module.importlib.util.find_spec
    monkeypatch.setattr(verify_module.importlib.util, "find_spec",
                        lambda name: None if name == "torch" else real_find_spec(name))
    result = verify(path, path)
    assert result.reference == result.candidate == "bert_jax"
    assert "torch not installed" in result.note and result.ok


def test_verify_gpt_bert_runs_bert_jax_on_both_sides(tmp_path):
    """No remote code: GPT-BERT is checked bert_jax against bert_jax, and says so; bf16
    rounding is accepted with a tolerance scaled to each output."""
    result = convert(NORBERT4_TINY / "masked_lm", tmp_path / "out", to="hf", dtype="bf16",
                     verify_output=True).verification
    assert result.reference == result.candidate == "bert_jax"
    assert "never executes" in result.note and "never executes" in result.summary()
    assert result.ok and 0 < result.diffs["logits"] < result.tolerances["logits"]


# inspect ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bert", "megatron-bert"])
def test_inspect_matches_transformers(tmp_path, capsys, model_type):
    """Parameter count, stored shapes and dtypes, and the tied decoder, as transformers has
    them; the Orbax conversion inspects the same."""
    model = make_hf_model(model_type, "ForMaskedLM")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    report = inspect_dir(tmp_path / "hf")

    assert report.num_parameters == model.num_parameters()
    stored = read_state_dict(tmp_path / "hf")
    state = model.state_dict()
    assert {r.stored: r.shape for r in report.rows} == {k: tuple(state[k].shape) for k in stored}
    assert all(row.dtype == "float32" for row in report.rows)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert report.tied == {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    assert not (report.unused or report.newly_initialised or report.problems)

    assert main(["inspect", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert f"{model.num_parameters():,}" in text and type(model).__name__ in text
    assert "shards" in text
    for key in stored:
        shape = "[" + ", ".join(map(str, state[key].shape)) + "]"
        assert any(line.startswith(key + " ") and shape in line for line in text.splitlines()), key

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--quiet"]) == 0
    orbax = inspect_dir(tmp_path / "orbax")
    assert orbax.num_parameters == model.num_parameters() and orbax.tied == report.tied
    assert sorted(row.target for row in orbax.rows) == sorted(row.stored for row in report.rows)


def test_inspect_untied_decoder(tmp_path):
    model = make_hf_model("bert", "ForMaskedLM", tie_word_embeddings=False)
    path = save_hf_model(model, tmp_path / "hf")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    report = inspect_dir(path)
    assert report.tied == {}
    assert "cls.predictions.decoder.weight" in {row.stored for row in report.rows}


def test_inspect_unused_and_new_weights_as_transformers_reports_them(tmp_path):
    """A pre-training checkpoint read as a masked LM (pooler and NSP unused), and a base
    model read as a classifier (head newly initialised): transformers' unexpected and
    missing keys."""
    path = save_hf_model(make_hf_model("bert", "ForPreTraining"), tmp_path / "pre")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    (tmp_path / "pre" / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    _, info = transformers.BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert set(inspect_dir(path).unused) == info["unexpected_keys"] != set()

    path = save_hf_model(make_hf_model("bert", "Model"), tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    _, info = transformers.BertForSequenceClassification.from_pretrained(
        path, output_loading_info=True)
    assert set(inspect_dir(path).newly_initialised) == info["missing_keys"] != set()


def test_inspect_gpt_bert_tied_output_embedding(tmp_path):
    """A NorBERT 4 file without the output embedding reads it from the input embedding."""
    specs = read_state_dict(NORBERT4_TINY / "masked_lm")
    assert not inspect_dir(NORBERT4_TINY / "masked_lm").tied
    del specs["classifier.emb2vocab.weight"]
    (tmp_path / "tied").mkdir()
    (tmp_path / "tied" / "config.json").write_text(
        (NORBERT4_TINY / "masked_lm" / "config.json").read_text())
    save_file(specs, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    report = inspect_dir(tmp_path / "tied")
    assert report.tied == {"classifier.emb2vocab.weight": "embedding.word_embedding.weight"}
    assert report.num_parameters == inspect_dir(NORBERT4_TINY / "masked_lm").num_parameters


def test_inspect_bad_directories(tmp_path, capsys, hf_dir):
    _, path = hf_dir()
    data = (Path(path) / "model.safetensors").read_bytes()
    (Path(path) / "model.safetensors").write_bytes(data[:100])
    capsys.readouterr()
    assert main(["inspect", path]) == 1
    assert_one_line_error(capsys, "model.safetensors", "corrupt")
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert_one_line_error(capsys, "missing", "no such directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a model")
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert_one_line_error(capsys, "empty", "not a model directory")
