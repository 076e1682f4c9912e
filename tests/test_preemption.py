"""Preemption on a slice: SIGTERM reaches one host only, at a step of its own; every process
stops at one agreed step with one complete checkpoint and exits 0, and the resumed run ends
with the uninterrupted run's params, bit for bit. 2 processes x 4 simulated CPU devices,
joined with `jax.distributed` over gloo."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import finish, start_two_processes

from bert_jax.convert.weight_files import read_state_dict

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-mlm.yaml"
STEPS, SAVE_EVERY = 16, 4


def command(corpus, run: Path, *extra) -> list[str]:
    sets = [f"data.train={corpus / 'train'}", "data.eval=null", f"train.output_dir={run}",
            f"train.steps={STEPS}", "optimizer.warmup_steps=4", f"train.save_every={SAVE_EVERY}",
            "train.log_every=1", "train.record_example_ids=true", "mesh.data=2", "mesh.fsdp=4"]
    args = ["pretrain", "--config", str(RECIPE), "--tokenizer", str(corpus / "tok"), "--quiet",
            *extra]
    for item in sets:
        args += ["--set", item]
    return args


def steps_fed(run: Path, process: int) -> list[int]:
    path = run / f"example_ids.process{process}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def wait_for(condition, processes, what: str) -> None:
    deadline = time.time() + 600
    while not condition():
        assert all(p.poll() is None for p in processes), f"a process ended before {what}"
        assert time.time() < deadline, f"no {what} in 10 minutes"
        time.sleep(0.02)


@pytest.fixture
def reference(corpus, tmp_path) -> Path:
    """The run no signal interrupts."""
    run = tmp_path / "uninterrupted"
    finish(start_two_processes(command(corpus, run), 4))
    return run


@pytest.mark.slow
def test_sigterm_to_one_host_stops_all_at_one_step(corpus, reference, tmp_path):
    """The signal reaches a random one of the two processes while the save of a random
    checkpoint is still being written in the background."""
    run = tmp_path / "preempted"
    processes = start_two_processes(command(corpus, run), 4)
    chosen = random.Random()
    first = SAVE_EVERY * chosen.randint(1, STEPS // SAVE_EVERY - 1)

    def saving() -> bool:  # a save from step `first` on is being written
        return any(int(p.name.split(".")[0]) >= first
                   for p in (run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))

    wait_for(saving, processes, f"a save in flight from step {first} on")
    signalled = chosen.randrange(2)
    processes[signalled].send_signal(signal.SIGTERM)
    finish(processes)

    stops = [steps_fed(run, i)[-1] for i in range(2)]
    assert stops[0] == stops[1] < STEPS, f"processes stopped at steps {stops}"
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stops[0], (saved, stops)
    assert not list((run / "checkpoints").glob("*tmp*")), "an incomplete checkpoint was left"
    assert not (run / "hf").exists()

    finish(start_two_processes(command(corpus, run, "--resume"), 4))
    resumed, expected = read_state_dict(run / "hf"), read_state_dict(reference / "hf")
    assert sorted(resumed) == sorted(expected)
    for key, tensor in expected.items():
        assert np.array_equal(resumed[key], tensor), key
