"""`bert-jax compile` and `--compile-only`: the recipe's real train step compiled for TPU
topologies (libtpu, no TPU) and for this machine's CPU, the report's numbers, the batch layout
it compiles for against the data pipelines' real batches, and bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import prepare_docstrings
from test_finetune import (
    add_tokenizer,
    write_classification,
    write_conll,
    write_squad,
    write_swag,
)

from bert_jax.cli import main
from bert_jax.data.batching import batches
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.modeling.presets import preset
from bert_jax.training import compile as aot
from bert_jax.training.finetune import FinetuneRecipe, FinetuneTrain, _model_inputs
from bert_jax.training.objectives import pretraining_head, pretraining_pipeline, private_pipeline
from bert_jax.training.recipe import load_recipe
from bert_jax.training.tasks import (
    ClassificationTask,
    MultipleChoiceTask,
    QuestionAnsweringTask,
    TokenClassificationTask,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GIB = 2**30
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e \".[tpu]\")")


def bert_jax(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def compiled(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    done = bert_jax(*args, "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(out.read_text())


def assert_real_numbers(report: dict, hbm: float | None) -> None:
    memory = report["memory"]
    assert 0 < memory["arguments"] and 0 < memory["temporaries"] and 0 < memory["total"]
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                               + memory["temporaries"])
    if hbm is not None:
        assert report["hbm_bytes"] == hbm and memory["total"] <= hbm and report["fits"] is True
    # The compiled program's FLOPs are the model's within a factor: for a tiny model they are
    # more (layer norms, softmax, the optimizer weigh as much as its matmuls).
    total = report["flops_per_chip"] * report["chips"]
    assert 0 < report["model_flops"] and report["model_flops"] / 4 < total < report[
        "model_flops"] * 4


@needs_libtpu
def test_tiny_mlm_on_a_v5e_slice(tmp_path):
    done, report = compiled(tmp_path, "compile", "--config", str(CONFIGS / "tiny-mlm.yaml"),
                            "--topology", "v5e:2x2")
    assert (report["target"], report["chips"], report["device_kind"]) == (
        "v5e:2x2", 4, "TPU v5 lite")
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["batch"] == {"input_ids": "int32[16,64]", "token_type_ids": "int32[16,64]",
                               "attention_mask": "int32[16,64]", "labels": "int32[16,64]",
                               "next_sentence_label": "int32[16]",
                               "masked_positions": "int32[16,10]"}
    assert_real_numbers(report, 16 * GIB)
    # Params and optimizer moments split over fsdp: gathered in the step, gradients reduced.
    kinds = {c["kind"]: c for c in report["collectives"]}
    assert {"all-gather", "all-reduce"} <= set(kinds)
    assert all(c["count"] > 0 and c["bytes"] > 0 for c in kinds.values())
    assert report["step_seconds"] == report["optimal_seconds"] > 0 and 0 < report["mfu"] <= 1
    assert report["peak_flops"] == 197e12
    assert "FITS" in done.stdout and "DOES NOT FIT" not in done.stdout
    assert "estimate (XLA cost model), not a measurement" in done.stdout
    assert "vocab_size 128: the preset's" in done.stdout
    assert "Traceback" not in done.stderr and "TPU_WORKER_HOSTNAMES" not in done.stderr


@needs_libtpu
def test_fine_tuning_on_a_v4_slice(tmp_path):
    """A fine-tuning recipe whose checkpoint is not here, compiled for the model `--model`
    names; v4 chips are one device each (megacore)."""
    done, report = compiled(tmp_path, "compile", "--config",
                            str(CONFIGS / "finetune-tiny-squad.yaml"), "--topology", "v4:2x2x1",
                            "--model", "tiny")
    assert (report["kind"], report["chips"], report["device_kind"]) == (
        "fine-tuning", 4, "TPU v4")
    assert report["model"].startswith("BertForQuestionAnswering")
    assert report["batch"]["start_positions"] == "int32[16]"
    assert report["batch"]["input_ids"] == "int32[16,64]"  # the longest bucket
    assert_real_numbers(report, 32 * GIB)
    assert "--model tiny (the recipe's own: runs/tiny-mlm/hf)" in done.stdout


@needs_libtpu
def test_a_step_that_does_not_fit(tmp_path):
    out = tmp_path / "report.json"
    done = bert_jax("compile", "--config", str(CONFIGS / "tiny-mlm.yaml"), "--topology",
                    "v5e:2x2", "--set", "data.global_batch_size=1048576", "--json", str(out),
                    cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "DOES NOT FIT" in done.stdout and "RESOURCE_EXHAUSTED" in done.stdout
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["memory"] is None
    assert "HBM" in report["error"]


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--topology", "v7x:2x2"], "unknown topology 'v7x:2x2'"),
    (["--topology", "v5e:3x3"], "--topology v5e:3x3: libtpu refused it"),
    (["--topology", "v5e:2x2", "--set", "mesh.fsdp=3"],
     "topology v5e:2x2 has 4 chips: mesh"),
    (["--topology", "v5e:4x8"], "topology v5e:4x8 has 32 chips: global batch 16 is not "
                                "divisible by the data x fsdp mesh axes (32 ways)"),
], ids=["unknown", "layout", "mesh", "batch"])
def test_bad_topology_is_one_line(tmp_path, args, message):
    done = bert_jax("compile", "--config", str(CONFIGS / "tiny-mlm.yaml"), *args, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("bert-jax: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not any(tmp_path.iterdir())


def test_without_libtpu_a_topology_is_one_line(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    assert main(["compile", "--config", str(CONFIGS / "tiny-mlm.yaml"),
                 "--topology", "v5e:2x2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bert-jax: error: --topology v5e:2x2: compiling for a TPU needs "
                          "libtpu, which is not installed")


def test_a_missing_checkpoint_asks_for_model(tmp_path):
    """`finetune --compile-only` reads the config of the run's checkpoint; none here."""
    done = bert_jax("finetune", "--config", str(CONFIGS / "finetune-tiny-ner.yaml"),
                    "--compile-only", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == ("bert-jax: error: runs/tiny-mlm/hf: no such model directory "
                           "(`bert-jax compile --model PRESET_OR_DIR` compiles for the model it "
                           "will hold)\n")


def test_pretrain_compile_only_on_this_machine(tmp_path):
    """No libtpu needed: the step compiled for the CPU, with the tokenizer's vocabulary."""
    (tmp_path / "tok").mkdir()
    tok = add_tokenizer(tmp_path / "tok")
    done, report = compiled(tmp_path, "pretrain", "--config", str(CONFIGS / "tiny-mlm.yaml"),
                            "--tokenizer", str(tok), "--compile-only")
    assert (report["target"], report["device_kind"], report["fits"]) == ("local", "cpu", None)
    assert_real_numbers(report, None)
    assert "vocab_size" not in done.stdout  # the tokenizer's, nothing assumed
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def layout(batch: dict) -> dict:
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return prepare_docstrings(tmp_path_factory.mktemp("docs"), 60, 50, 300)


@pytest.mark.parametrize("config, sets", [
    ("tiny-mlm.yaml", []),
    ("tiny-mlm.yaml", ["data.nsp=false", "data.max_predictions_per_seq=null"]),
    ("tiny-norbert4-mlm.yaml", []),
    ("tiny-mlm.yaml", ["data.nsp=false", "dp.clip_norm=1.0", "dp.delta=1e-5",
                       "dp.noise_multiplier=1.0"]),
], ids=["bert", "bert-mlm-only", "gpt-bert", "dp"])
def test_pretraining_batch_is_the_pipelines(docs, config, sets):
    """What `compile` compiles for is what the trainer's pipeline yields (DP-SGD: but for the
    rows, which the data's size decides)."""
    recipe = load_recipe(CONFIGS / config, [*sets, f"data.train={docs / 'train'}"])
    tokenizer = load_tokenizer(docs / "tok")
    config = preset(recipe.model.preset, vocab_size=300)
    config = config.with_head(pretraining_head(config, recipe.data.nsp))
    if recipe.dp is None:
        real = next(pretraining_pipeline(recipe.data, recipe.data.train, config, tokenizer, 0))
        assert aot.batch_spec(recipe, config) == layout(real)
        return
    mesh = aot.sharding.make_mesh(recipe.mesh)
    data, plan = private_pipeline(recipe.data, recipe.dp, config, tokenizer, 0, 10, mesh)
    real = layout(next(data))
    spec = aot.batch_spec(recipe, config, plan)
    assert {k: (s[1:], d) for k, (s, d) in spec.items()} == {
        k: (s[1:], d) for k, (s, d) in real.items()}


@pytest.mark.parametrize("task, write, file, head", [
    (ClassificationTask, write_classification, "train.csv", "ForSequenceClassification"),
    (TokenClassificationTask, write_conll, "train.conll", "ForTokenClassification"),
    (QuestionAnsweringTask, write_squad, "train.json", "ForQuestionAnswering"),
    (MultipleChoiceTask, write_swag, "train.csv", "ForMultipleChoice"),
], ids=["classification", "ner", "qa", "swag"])
@pytest.mark.parametrize("family", ["tiny", "norbert4-tiny"])
def test_fine_tuning_batch_is_the_trainers(tmp_path, task, write, file, head, family):
    """The trainer's batch at the longest bucket, as the task's data makes it and the model
    takes it (GPT-BERT: no token types)."""
    tokenizer = load_tokenizer(add_tokenizer(tmp_path))
    columns = ({"text_column": "text"} if task is ClassificationTask else
               {"doc_stride": 8} if task is QuestionAnsweringTask else {})
    section = task(train=str(write(tmp_path / file, 8, 0)), max_seq_length=32, **columns)
    prepared = section.prepare(tokenizer)
    config = preset(family).with_head(head, prepared.num_labels or (
        len(prepared.labels) if prepared.labels else None))
    if prepared.problem_type is not None:
        config = aot.dataclasses.replace(config, problem_type=prepared.problem_type)
    batch = next(batches(prepared.train, batch_size=4, buckets=(32,), pad_id=0, seed=0,
                         num_epochs=None))
    real = layout(_model_inputs(config, prepared)(batch, "train"))
    recipe = FinetuneRecipe(data=section, train=FinetuneTrain(batch_size=4))
    assert aot.batch_spec(recipe, config) == real


def test_collectives_of_a_partitioned_module():
    """Async collectives count once, by their output; the TPU's reduce-scatter fusion counts
    as one reduce-scatter, not as the all-reduce inside it."""
    hlo = """
%all-reduce-scatter.1 (p: f32[8,4]) -> f32[2,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %all-reduce.2 = f32[8,4]{1,0} all-reduce(%p), channel_id=1, to_apply=%add
  ROOT %ds = f32[2,4]{1,0} dynamic-slice(%all-reduce.2, %c, %c), dynamic_slice_sizes={2,4}
}

ENTRY %main (a: bf16[4,16], b: f32[8,4]) -> f32[2,4] {
  %a = bf16[4,16]{1,0} parameter(0)
  %ag = bf16[16,16]{1,0:T(8,128)(2,1)} all-gather(%a), channel_id=2, dimensions={0}
  %ags = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%a), channel_id=3
  %agd = bf16[16,16]{1,0} all-gather-done(%ags)
  %cps = (f32[8,4]{1,0}, f32[8,4]{1,0}, u32[], u32[]) collective-permute-start(%b)
  %cpd = f32[8,4]{1,0} collective-permute-done(%cps)
  %ar = (f32[]{:T(128)}, s32[]) all-reduce(%x, %y), channel_id=4, to_apply=%add
  ROOT %rs = f32[2,4]{1,0} fusion(%b), kind=kCustom, calls=%all-reduce-scatter.1
}
"""
    assert aot.collectives(hlo) == (
        aot.Collective("all-gather", 2, 2 * 16 * 16 * 2),
        aot.Collective("reduce-scatter", 1, 2 * 4 * 4),
        aot.Collective("all-reduce", 1, 8),
        aot.Collective("collective-permute", 1, 8 * 4 * 4))
