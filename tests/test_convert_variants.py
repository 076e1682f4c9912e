"""Loading the Hugging Face checkpoint variants found in the wild, and refusing bad input.

Every variant is built from a tiny random `transformers` model by re-writing its saved
state dict; the loaded bert_jax model must reproduce the torch outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import VOCAB, example_batch, make_hf_model, run_hf, save_hf_model
from safetensors.torch import load_file, save_file

import bert_jax
from bert_jax.convert import weight_files

MODEL_TYPES = ("bert", "megatron-bert")
PREFIX = {"bert": "Bert", "megatron-bert": "MegatronBert"}
ATOL = 1e-4


# Helpers -------------------------------------------------------------------------------------

def saved_tensors(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def remove_weights(model_dir) -> None:
    for pattern in ("model*.safetensors*", "pytorch_model*.bin*"):
        for path in Path(model_dir).glob(pattern):
            path.unlink()


def write_weights(model_dir, tensors: dict[str, torch.Tensor], layout="safetensors",
                  shards=3) -> None:
    """Replace the directory's weights with `tensors` as one file or `shards` shards + index."""
    model_dir = Path(model_dir)
    remove_weights(model_dir)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # no shared memory
    ext = ".bin" if layout.startswith("bin") else ".safetensors"

    def write(part, name):
        if ext == ".bin":
            torch.save(part, model_dir / name)
        else:
            save_file(part, str(model_dir / name), metadata={"format": "pt"})

    if not layout.endswith("sharded"):
        write(tensors, "pytorch_model.bin" if ext == ".bin" else "model.safetensors")
        return
    stem = "pytorch_model" if ext == ".bin" else "model"
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        part = {k: tensors[k] for k in keys[i::shards]}
        write(part, name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / f"{stem}{ext}.index.json").write_text(json.dumps(index))


def edit_config(model_dir, **changes) -> None:
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def assert_close(jax_array, torch_tensor, mask=None, atol=ATOL) -> None:
    """Max abs diff below `atol`, on positions where `mask` (attention_mask) is 1."""
    actual, expected = np.asarray(jax_array), torch_tensor.detach().numpy()
    assert actual.shape == expected.shape
    if mask is not None:
        actual, expected = actual[mask == 1], expected[mask == 1]
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def assert_same_logits(model_dir, torch_model, torch_field="logits", **load_kw) -> None:
    """The bert_jax model loaded from `model_dir` gives the torch model's logits."""
    batch = example_batch()
    out = bert_jax.from_pretrained(model_dir, **load_kw)(**batch)
    assert_close(out.logits, getattr(run_hf(torch_model, batch), torch_field),
                 batch["attention_mask"])


# Checkpoint variants -------------------------------------------------------------------------

def legacy_gamma_beta(tensors, model):
    renamed = {}
    for key, value in tensors.items():
        if key.endswith("LayerNorm.weight"):
            key = key[: -len("weight")] + "gamma"
        elif key.endswith("LayerNorm.bias"):
            key = key[: -len("bias")] + "beta"
        renamed[key] = value
    assert any(k.endswith(".gamma") for k in renamed)
    return renamed


def stray_buffers(tensors, model):
    return {**tensors,
            "bert.embeddings.position_ids": torch.arange(64, dtype=torch.int64)[None],
            "bert.embeddings.token_type_ids": torch.zeros(1, 64, dtype=torch.int64)}


def explicit_tied_decoder(tensors, model):
    state = model.state_dict()  # has cls.predictions.decoder.weight / .bias (tied aliases)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(state)
    return state


def bias_only_in_decoder(tensors, model):
    tensors = dict(tensors)
    tensors["cls.predictions.decoder.bias"] = tensors.pop("cls.predictions.bias")
    return tensors


VARIANTS = {f.__name__: f for f in (legacy_gamma_beta, stray_buffers, explicit_tied_decoder,
                                    bias_only_in_decoder)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_state_dict_variant(hf_dir, model_type, variant):
    """Key variants of a masked-LM checkpoint load to the same model as the original."""
    model, path = hf_dir(model_type, "ForMaskedLM")
    write_weights(path, VARIANTS[variant](saved_tensors(path), model))
    assert_same_logits(path, model)


@pytest.mark.parametrize("layout", ["bin", "sharded", "bin_sharded"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_file_layout(hf_dir, model_type, layout):
    """pytorch_model.bin only, sharded safetensors with an index, and sharded .bin load alike."""
    model, path = hf_dir(model_type, "ForMaskedLM")
    write_weights(path, saved_tensors(path), layout)
    assert not (Path(path) / "model.safetensors").exists()
    assert_same_logits(path, model)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_legacy_names_in_bin(hf_dir, model_type):
    """gamma/beta names inside a pytorch_model.bin (the oldest checkpoints) load too."""
    model, path = hf_dir(model_type, "ForMaskedLM")
    write_weights(path, legacy_gamma_beta(saved_tensors(path), model), "bin")
    assert_same_logits(path, model)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_untied_decoder_load(hf_dir, model_type):
    """An untied masked LM (own decoder weight and bias) loads to the torch model's logits."""
    model, path = hf_dir(model_type, "ForMaskedLM", tie_word_embeddings=False)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(
        saved_tensors(path))
    assert_same_logits(path, model)


def test_untied_decoder_save(hf_dir, tmp_path):
    """An untied masked LM saved by bert_jax reloads in transformers with the same logits."""
    model, path = hf_dir("bert", "ForMaskedLM", tie_word_embeddings=False)
    bert_jax.from_pretrained(path).save_pretrained(tmp_path / "out")
    reloaded = type(model).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    batch = example_batch()
    assert_close(run_hf(reloaded, batch).logits, run_hf(model, batch).logits,
                 batch["attention_mask"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pretraining_checkpoint_as_masked_lm(hf_dir, model_type, caplog):
    """Pooler and NSP weights in a file read as a masked LM are left unused, not an error."""
    model, path = hf_dir(model_type, "ForPreTraining")
    edit_config(path, architectures=[PREFIX[model_type] + "ForMaskedLM"])
    with caplog.at_level(logging.INFO, logger="bert_jax"):
        assert_same_logits(path, model, torch_field="prediction_logits")
    assert "cls.seq_relationship.weight" in caplog.text
    assert "bert.pooler.dense.weight" in caplog.text


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_base_model_with_new_classifier(hf_dir, model_type, caplog):
    """A bare encoder file (no `bert.` prefix) loads under a new head: encoder weights from the
    file, classifier newly initialised with a warning."""
    model, path = hf_dir(model_type, "Model")
    assert not any(k.startswith("bert.") for k in saved_tensors(path))
    with caplog.at_level(logging.WARNING, logger="bert_jax"):
        jax_model = bert_jax.from_pretrained(path, head="ForSequenceClassification", num_labels=3)
    warnings = [r for r in caplog.records if r.name == "bert_jax" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "newly initialized" in message
    assert "classifier.weight" in message and "classifier.bias" in message
    assert "pooler" not in message  # the bare model's pooler was in the file

    batch = example_batch()
    out = jax_model(**batch, output_hidden_states=True)
    assert out.logits.shape == (3, 3)
    torch_out = run_hf(model, batch)
    assert_close(out.hidden_states[-1], torch_out.last_hidden_state, batch["attention_mask"])
    np.testing.assert_array_equal(
        np.asarray(jax_model.params["bert"]["embeddings"]["word_embeddings"]["embedding"]),
        saved_tensors(path)["embeddings.word_embeddings.weight"].numpy())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_head_checkpoint_as_base_model(hf_dir, model_type):
    """A sequence-classification file loaded with head="Model" is its encoder and pooler."""
    model, path = hf_dir(model_type, "ForSequenceClassification")
    batch = example_batch()
    out = bert_jax.from_pretrained(path, head="Model")(**batch)
    with torch.no_grad():
        torch_out = getattr(model, model.base_model_prefix)(
            **{k: torch.as_tensor(v) for k, v in batch.items()})
    assert_close(out.last_hidden_state, torch_out.last_hidden_state, batch["attention_mask"])
    assert_close(out.pooler_output, torch_out.pooler_output)


# Writing -------------------------------------------------------------------------------------

def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.dtype.itemsize}")


def test_write_safetensors_shards_round_trip(tmp_path):
    """Shards plus an index above max_shard_bytes; reading back is bit-identical, bf16 too."""
    rng = np.random.default_rng(0)
    tensors = {
        "a.fp32": rng.standard_normal((16, 8)).astype(np.float32),
        "b.bf16": rng.standard_normal((32, 8)).astype(ml_dtypes.bfloat16),
        "c.fp16": rng.standard_normal((7,)).astype(np.float16),
        "d.int64": np.arange(64, dtype=np.int64)[None],
        "e.fp32": np.array([np.inf, -0.0, 1e-45, np.nan], np.float32),
    }
    weight_files.write_safetensors(tmp_path, tensors, max_shard_bytes=600)

    index = json.loads((tmp_path / weight_files.SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert not (tmp_path / weight_files.SAFETENSORS).exists()

    loaded = weight_files.read_state_dict(tmp_path)
    assert set(loaded) == set(tensors)
    for key, expected in tensors.items():
        assert loaded[key].dtype == expected.dtype, key
        assert loaded[key].shape == expected.shape, key
        np.testing.assert_array_equal(_bits(loaded[key]), _bits(expected), err_msg=key)


def test_write_safetensors_single_file(tmp_path):
    """Without a limit (or under it) the tensors go to one model.safetensors."""
    tensors = {"x": np.ones((4, 4), ml_dtypes.bfloat16)}
    weight_files.write_safetensors(tmp_path, tensors, max_shard_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [weight_files.SAFETENSORS]
    loaded = weight_files.read_state_dict(tmp_path)
    assert loaded["x"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(loaded["x"]), _bits(tensors["x"]))


# Bad input -----------------------------------------------------------------------------------
# Each breaker damages a saved BertForMaskedLM directory and returns the substrings that the
# BertJaxError message must contain.

MISSING_KEY = "bert.encoder.layer.1.attention.self.key.weight"
RESHAPED_KEY = "bert.encoder.layer.0.intermediate.dense.weight"  # [37, 32]


def unknown_model_type(d):
    edit_config(d, model_type="roberta")
    return ["model_type", "'roberta'", "config.json"]


def unknown_architecture(d):
    edit_config(d, architectures=["BertForCausalLM"])
    return ["BertForCausalLM", "config.json"]


def missing_tensor(d):
    tensors = saved_tensors(d)
    del tensors[MISSING_KEY]
    write_weights(d, tensors)
    return [MISSING_KEY, str(d / "model.safetensors")]


def wrong_shape(d):
    tensors = saved_tensors(d)
    tensors[RESHAPED_KEY] = torch.zeros(36, 32)
    write_weights(d, tensors)
    return [RESHAPED_KEY, "(36, 32)", "(37, 32)", "model.safetensors"]


def fp8_tensor(d):
    tensors = saved_tensors(d)
    tensors[RESHAPED_KEY] = tensors[RESHAPED_KEY].to(torch.float8_e4m3fn)
    write_weights(d, tensors)
    return [RESHAPED_KEY, "F8_E4M3", "model.safetensors"]


def truncated_safetensors(d):
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [str(path), "corrupt or truncated"]


def no_weights(d):
    remove_weights(d)
    return ["no model found"]


def empty_directory(d):
    for path in d.iterdir():
        path.unlink()
    return ["no model found"]


def missing_shard(d):
    write_weights(d, saved_tensors(d), "sharded")
    (d / "model-00002-of-00003.safetensors").unlink()
    return ["model-00002-of-00003.safetensors", "model.safetensors.index.json"]


def tensor_in_no_shard(d):
    write_weights(d, saved_tensors(d), "sharded")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["bert.extra.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    return ["bert.extra.weight", "model.safetensors.index.json"]


def invalid_config_json(d):
    (d / "config.json").write_text('{"model_type": "bert",')
    return ["config.json", "not valid JSON"]


def weight_map_not_strings(d):
    write_weights(d, saved_tensors(d), "sharded")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][MISSING_KEY] = 3
    index_path.write_text(json.dumps(index))
    return ["model.safetensors.index.json"]


def nested_pytorch_bin(d):
    state = saved_tensors(d)
    remove_weights(d)
    torch.save({"state_dict": state, "epoch": 3}, d / "pytorch_model.bin")  # a training checkpoint
    return [str(d / "pytorch_model.bin")]


def invalid_pytorch_bin(d):
    remove_weights(d)
    (d / "pytorch_model.bin").write_bytes(b"this is not a torch file" * 10)
    return [str(d / "pytorch_model.bin")]


BREAKERS = [
    unknown_model_type, unknown_architecture, missing_tensor, wrong_shape, fp8_tensor,
    truncated_safetensors,
    no_weights, empty_directory, missing_shard, tensor_in_no_shard, invalid_config_json,
    invalid_pytorch_bin, weight_map_not_strings, nested_pytorch_bin,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_directory(hf_dir, breaker):
    """Bad files raise BertJaxError naming the file or field, never a bare traceback."""
    _, path = hf_dir("bert", "ForMaskedLM")
    expected = breaker(Path(path))
    with pytest.raises(bert_jax.BertJaxError) as info:
        bert_jax.from_pretrained(path)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path_factory.mktemp("tiny"))
    return bert_jax.from_pretrained(path)


def _too_long():
    return {"input_ids": np.ones((1, 65), np.int64)}, "max_position_embeddings=64"


def _id_too_large():
    ids = example_batch()["input_ids"].copy()
    ids[0, 0] = VOCAB
    return {"input_ids": ids}, "vocab_size"


def _negative_id():
    ids = example_batch()["input_ids"].copy()
    ids[1, 2] = -1
    return {"input_ids": ids}, "vocab_size"


def _token_type_too_large():
    batch = example_batch()
    batch["token_type_ids"] = np.full_like(batch["token_type_ids"], 2)
    return batch, "type_vocab_size"


@pytest.mark.parametrize("make_inputs", [_too_long, _id_too_large, _negative_id,
                                         _token_type_too_large])
def test_bad_inputs(tiny_model, make_inputs):
    """Inputs that JAX would silently clamp are refused with the config field named."""
    inputs, field = make_inputs()
    with pytest.raises(bert_jax.BertJaxError, match=field):
        tiny_model(**inputs)


def test_longest_valid_input(tiny_model):
    """Exactly max_position_embeddings tokens is accepted."""
    out = tiny_model(np.full((1, 64), VOCAB - 1, np.int64))
    assert out.logits.shape == (1, 64, VOCAB)


def test_hub_id_offline_is_a_clean_error(monkeypatch):
    """A Hub id that cannot be fetched (here: offline mode) names the id and the cause."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time
    with pytest.raises(bert_jax.BertJaxError, match="ltg/norbert4-base: not a local directory"):
        bert_jax.from_pretrained("ltg/norbert4-base")
