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
pytestmark = pytest.mark.xdist_group("preemption")  # one worker: the reference run is shared


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


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The run no signal interrupts."""
    run = tmp_path_factory.mktemp("uninterrupted")
    finish(start_two_processes(command(corpus, run), 4))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("when", ["random step", "save in flight"])
def test_sigterm_to_one_host_stops_all_at_one_step(corpus, reference, tmp_path, when):
    run = tmp_path / "preempted"
    processes = start_two_processes(command(corpus, run), 4)
    chosen = random.Random()
    if when == "random step":
        at = chosen.randint(2, STEPS - 4)
        wait_for(lambda: (run / "example_ids.process0.jsonl").exists()
                 and len(steps_fed(run, 0)) >= at, processes, f"step {at}")
    else:  # while Orbax writes a checkpoint in the background
        wait_for(lambda: any(".orbax-checkpoint-tmp" in p.name
                             for p in (run / "checkpoints").glob("*")), processes, "save")
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
