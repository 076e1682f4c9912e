"""Multi-host pretraining on localhost: 2 processes x 8 simulated CPU devices, joined with
`jax.distributed` over gloo, train and checkpoint, are killed (SIGKILL), resume, and log the
same losses as 1 process with 16 devices on the same data."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import finish, start_cli, start_two_processes, transformers

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-mlm.yaml"
STEPS, KILL_AFTER_CHECKPOINT = 24, 8


def command(corpus, run: Path, *extra) -> list[str]:
    sets = [f"data.train={corpus / 'train'}", f"data.eval={corpus / 'eval'}",
            f"train.output_dir={run}", f"train.steps={STEPS}", "optimizer.total_steps=24",
            "optimizer.warmup_steps=4", f"train.save_every={KILL_AFTER_CHECKPOINT}",
            "train.eval_every=12", "train.eval_batches=2", "train.log_every=1",
            "train.record_example_ids=true", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2",
            # an MLP width that tensor=2 divides (the tiny preset's 37 does not)
            "model.overrides={max_position_embeddings: 128, intermediate_size: 48}"]
    args = ["pretrain", "--config", str(RECIPE), "--tokenizer", str(corpus / "tok"), "--quiet",
            *extra]
    for item in sets:
        args += ["--set", item]
    return args


def last_per_step(path: Path, key: str) -> dict:
    """step -> value of `key`, the last line of each step winning (a re-run step after a
    crash appears twice)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one_process(corpus, tmp_path):
    single = tmp_path / "single"
    finish([start_cli(command(corpus, single), 16)])

    run = tmp_path / "two"
    processes = start_two_processes(command(corpus, run), 8)
    checkpoint = run / "checkpoints" / str(KILL_AFTER_CHECKPOINT)
    deadline = time.time() + 600
    while not checkpoint.is_dir() and time.time() < deadline and \
            all(p.poll() is None for p in processes):
        time.sleep(0.05)
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in processes), "not killed mid-run"
    assert checkpoint.is_dir() and not (run / "hf").exists()
    finish(start_two_processes(command(corpus, run, "--resume"), 8))

    expected = last_per_step(single / "log.jsonl", "loss")
    losses = last_per_step(run / "log.jsonl", "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step
    evals = last_per_step(run / "log.jsonl", "eval_mlm_loss")
    assert evals == pytest.approx(last_per_step(single / "log.jsonl", "eval_mlm_loss"), abs=1e-5)

    # Each process fed its own half of every global batch, and together exactly the batches
    # of the one-process run: nothing repeated or skipped across the kill.
    whole = last_per_step(single / "example_ids.process0.jsonl", "example_ids")
    halves = [last_per_step(run / f"example_ids.process{i}.jsonl", "example_ids")
              for i in range(2)]
    assert all(sorted(half) == sorted(whole) for half in halves)
    assert all(halves[0][s] + halves[1][s] == whole[s] for s in whole)
    # The export, gathered from both processes, loads in transformers.
    assert transformers.BertForPreTraining.from_pretrained(run / "hf").num_parameters() > 0
