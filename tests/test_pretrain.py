"""End to end: real text found on the machine (Python's own docstrings) -> prepare-data ->
pretrain -> checkpoints, resume, held-out eval and an HF export that transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from conftest import (
    make_hf_model,
    optimised_env,
    prepare_docstrings,
    save_hf_model,
    transformers,
)

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.data.pipeline import split_example_id
from bert_jax.data.prepare import read_shards


def pretrain(corpus, out, steps, *extra, resume=False):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny-mlm.yaml"
    sets = [f"data.train={corpus / 'train'}", f"data.eval={corpus / 'eval'}",
            f"train.output_dir={out}", f"train.steps={steps}", "optimizer.total_steps=40",
            "optimizer.warmup_steps=5", "train.save_every=10", "train.eval_every=20",
            "train.log_every=5", *extra]
    args = ["pretrain", "--config", str(recipe), "--tokenizer", str(corpus / "tok"), "--quiet"]
    args += ["--resume"] if resume else []
    for item in sets:
        args += ["--set", item]
    return main(args)


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_resume_and_export(corpus, tmp_path):
    assert pretrain(corpus, tmp_path / "straight", 40) == 0
    # Stopped at step 20, then resumed: the same params bit for bit, the same logged losses.
    assert pretrain(corpus, tmp_path / "resumed", 20) == 0
    assert pretrain(corpus, tmp_path / "resumed", 40) == 1  # refuses without --resume
    assert pretrain(corpus, tmp_path / "resumed", 40, resume=True) == 0
    straight = read_state_dict(tmp_path / "straight" / "hf")
    resumed = read_state_dict(tmp_path / "resumed" / "hf")
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    losses = {r["step"]: r["loss"] for r in logged(tmp_path / "straight") if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in logged(tmp_path / "resumed") if "loss" in r}
    assert resumed_losses == losses

    assert (tmp_path / "straight" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard (its own reader) sees the same scalars as log.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "straight" / "tensorboard")).Reload()
    assert {"loss", "learning_rate", "tokens_per_second", "eval_mlm_loss"} <= set(
        events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses, rel=1e-6)
    evals = [r for r in logged(tmp_path / "straight") if "eval_mlm_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]  # the baseline, then every eval_every
    assert 0 < evals[-1]["eval_mlm_accuracy"] <= 1 and evals[-1]["eval_mlm_perplexity"] > 1
    model = transformers.BertForPreTraining.from_pretrained(tmp_path / "straight" / "hf")
    assert model.config.vocab_size == json.loads(
        (tmp_path / "straight" / "hf" / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_continued_pretraining_from_transformers(corpus, tmp_path):
    """Continue an HF checkpoint saved by transformers; the export loads back in it."""
    vocab = json.loads((corpus / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    source = save_hf_model(make_hf_model("bert", "ForMaskedLM", vocab_size=len(vocab),
                                         max_position_embeddings=128), tmp_path / "source")
    assert pretrain(corpus, tmp_path / "continued", 10, f"model.init_from={source}",
                    "model.preset=null", "data.nsp=false") == 0
    exported = tmp_path / "continued" / "hf"
    model = transformers.BertForMaskedLM.from_pretrained(exported)
    before, after = read_state_dict(Path(source)), read_state_dict(exported)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert model.config.architectures == ["BertForMaskedLM"]
    assert not np.array_equal(before[key], after[key])  # it trained
    assert np.abs(before[key] - after[key]).max() < 0.1  # from the source, not from scratch


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume(corpus, tmp_path):
    """SIGKILL mid-run (async checkpoints in flight), then --resume: the final params equal an
    uninterrupted run's bit for bit, and every step logged by either part of the interrupted
    run has the uninterrupted run's loss (so the same batches were consumed)."""
    import os
    import random
    import signal
    import time

    assert pretrain(corpus, tmp_path / "straight", 40, "train.log_every=1",
                    "train.record_example_ids=true") == 0
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny-mlm.yaml"
    run = tmp_path / "killed"
    sets = [f"data.train={corpus / 'train'}", f"data.eval={corpus / 'eval'}",
            f"train.output_dir={run}", "train.steps=40", "optimizer.total_steps=40",
            "optimizer.warmup_steps=5", "train.save_every=5", "train.eval_every=20",
            "train.log_every=1", "train.record_example_ids=true"]
    args = [sys.executable, "-m", "bert_jax.cli", "pretrain", "--config", str(recipe),
            "--tokenizer", str(corpus / "tok"), "--quiet"]
    for item in sets:
        args += ["--set", item]
    kill_after = random.Random().randint(8, 30)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run / "log.jsonl").is_file() and any(
                r.get("step", 0) >= kill_after for r in logged(run)):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "hf").exists()

    assert main(args[3:] + ["--resume"]) == 0
    straight = read_state_dict(tmp_path / "straight" / "hf")
    resumed = read_state_dict(run / "hf")
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    expected = {r["step"]: r["loss"] for r in logged(tmp_path / "straight") if "loss" in r}
    seen = [(r["step"], r["loss"]) for r in logged(run) if "loss" in r]
    assert {step for step, _ in seen} == set(expected)
    assert all(loss == expected[step] for step, loss in seen)
    # The examples fed, step by step, from the recorded ids: the killed run re-fed the steps
    # after its last checkpoint (logged twice) with the same examples, so nothing repeats
    # or goes missing; and no example appears twice within the epoch.
    fed = [json.loads(line)
           for line in (run / "example_ids.process0.jsonl").read_text().splitlines()]
    straight = tmp_path / "straight" / "example_ids.process0.jsonl"
    uninterrupted = [json.loads(line) for line in straight.read_text().splitlines()]
    by_step = {r["step"]: r["example_ids"] for r in uninterrupted}
    assert sorted(by_step) == list(range(1, 41))
    assert all(r["example_ids"] == by_step[r["step"]] for r in fed)
    assert {r["step"] for r in fed} == set(by_step)
    documents = len(grain.sources.ArrayRecordDataSource(read_shards(corpus / "train")))
    first_epoch = [i for step in sorted(by_step) for i in by_step[step]
                   if split_example_id(i, documents)[0] == 0]
    assert len(first_epoch) == len(set(first_epoch))


@pytest.mark.slow
def test_gpt_bert_pretraining(corpus, tmp_path):
    """NorBERT 4 from scratch: the hybrid objective trains, held-out masked and causal losses
    are both reported, and the export is a GPT-BERT masked LM with the tokenizer's ids."""
    run = tmp_path / "gpt_bert"
    assert pretrain(corpus, run, 30, "model.preset=norbert4-tiny", "model.overrides={}",
                    "data.nsp=false",
                    "data.masked_ratio=0.75", "optimizer.total_steps=30",
                    "train.eval_every=30", "train.log_every=1") == 0
    records = logged(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    final = [r for r in records if "eval_causal_loss" in r][-1]
    assert final["eval_mlm_loss"] > 0 and final["eval_causal_loss"] > 0
    config = json.loads((run / "hf" / "config.json").read_text())
    tokenizer = json.loads((corpus / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["architectures"] == ["GptBertForMaskedLM"]
    assert (config["bos_token_id"], config["mask_token_id"]) == (tokenizer["[CLS]"],
                                                                 tokenizer["[MASK]"])
    model = bert_jax.from_pretrained(run / "hf")
    assert model(np.array([[tokenizer["[CLS]"], 7, 8, 9]])).logits.shape == (1, 4, len(tokenizer))


@pytest.mark.slow
def test_private_continued_pretraining(corpus, tmp_path):
    """DP-SGD continued MLM pretraining from a transformers checkpoint: it completes, logs
    epsilon as it goes (equal to the accountant's figure for the run's sampling rate), and
    its export loads in transformers."""
    from bert_jax.data.private_batches import mlm_examples
    from bert_jax.training.privacy import epsilon

    vocab = json.loads((corpus / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    source = save_hf_model(make_hf_model("bert", "ForMaskedLM", vocab_size=len(vocab),
                                         max_position_embeddings=128), tmp_path / "source")
    run = tmp_path / "private"
    assert pretrain(corpus, run, 6, f"model.init_from={source}", "model.preset=null",
                    "data.nsp=false", "train.log_every=2", "dp.clip_norm=1.0",
                    "dp.delta=1e-5", "dp.noise_multiplier=1.1") == 0
    records = [r for r in logged(run) if "epsilon" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    examples = len(mlm_examples(read_shards(corpus / "train"), 64, vocab["[CLS]"], vocab["[SEP]"]))
    for r in records:
        assert r["epsilon"] == pytest.approx(epsilon(1.1, 16 / examples, r["step"], 1e-5),
                                             rel=1e-9)
    assert records[0]["epsilon"] < records[-1]["epsilon"]
    assert transformers.BertForMaskedLM.from_pretrained(run / "hf").num_parameters() > 0


@pytest.mark.slow
def test_held_out_masked_loss_falls_by_40_percent(tmp_path):
    """Real text found on the machine (the standard library's docstrings, held out by
    document): configs/tiny-norbert4-mlm.yaml lowers the held-out masked-LM loss by at least
    40% from its step-0 value, and leaves the loss curve as a PNG."""
    prepare_docstrings(tmp_path, 2240, 2000, 200)
    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny-norbert4-mlm.yaml"
    args = [sys.executable, "-m", "bert_jax.cli", "pretrain", "--config", str(recipe),
            "--tokenizer", str(tmp_path / "tok"), "--quiet"]
    for item in (f"data.train={tmp_path / 'train'}", f"data.eval={tmp_path / 'eval'}",
                 f"train.output_dir={run}"):
        args += ["--set", item]
    done = subprocess.run(args, env=optimised_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    held_out = {r["step"]: r["eval_mlm_loss"] for r in logged(run) if "eval_mlm_loss" in r}
    assert held_out[0] == pytest.approx(np.log(200), rel=0.05)  # an untrained model's loss
    assert held_out[1000] <= 0.6 * held_out[0], held_out
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
