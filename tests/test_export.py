"""`bert-jax export`: a saved step of a pretraining run, trained on 16 simulated devices,
exported on this process's one device, as the run's own export writes it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import simulated_devices_env, transformers

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-mlm.yaml"


# One worker runs the module's tests: its fixture trains a model.
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """10 steps of tiny-mlm on 16 CPU devices, checkpointed at steps 5 and 10."""
    out = tmp_path_factory.mktemp("export") / "run"
    sets = [f"data.train={corpus / 'train'}", "data.eval=null", f"train.output_dir={out}",
            "train.steps=10", "optimizer.warmup_steps=2", "train.save_every=5",
            "train.log_every=5"]
    args = [sys.executable, "-m", "bert_jax.cli", "pretrain", "--config", str(RECIPE),
            "--tokenizer", str(corpus / "tok"), "--quiet"]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, env=simulated_devices_env(16), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def export(*args: str) -> int:
    return main(["export", *map(str, args)])


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bert-jax: error: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_export_any_step(run, tmp_path):
    assert export(run, tmp_path / "newest") == 0  # step 10, the run's last
    assert export(run, tmp_path / "step5", "--step", 5) == 0
    final, newest = read_state_dict(run / "hf"), read_state_dict(tmp_path / "newest")
    assert final.keys() == newest.keys()
    assert all(np.array_equal(final[k], newest[k]) for k in final)
    assert (json.loads((run / "hf" / "config.json").read_text())
            == json.loads((tmp_path / "newest" / "config.json").read_text()))
    step5 = read_state_dict(tmp_path / "step5")
    assert step5.keys() == final.keys()
    assert not all(np.array_equal(final[k], step5[k]) for k in final)

    model, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "step5",
                                                                  output_loading_info=True)
    assert not any(info.values()), info
    assert (transformers.AutoTokenizer.from_pretrained(tmp_path / "step5").get_vocab()
            == transformers.AutoTokenizer.from_pretrained(run / "hf").get_vocab())
    ours = model.state_dict()
    assert all(np.array_equal(ours[k].numpy(), step5[k]) for k in step5)

    # The Orbax format holds the same weights.
    assert export(run, tmp_path / "orbax5", "--step", 5, "--format", "orbax") == 0
    from_orbax = bert_jax.from_pretrained(tmp_path / "orbax5")
    from_hf = bert_jax.from_pretrained(tmp_path / "step5")
    assert from_orbax.config == from_hf.config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(from_orbax.params),
                                                   jax.tree.leaves(from_hf.params)))


@pytest.mark.slow
def test_export_errors(run, tmp_path, capsys):
    assert export(tmp_path, tmp_path / "out") == 1
    assert "not a run directory" in error_of(capsys)
    assert export(run, tmp_path / "out", "--step", 7) == 1
    assert "no checkpoint of step 7 (available: 5, 10)" in error_of(capsys)
    assert export(run, run / "hf") == 1  # the output exists
    assert "--overwrite" in error_of(capsys)

    # A save killed midway leaves Orbax's temporary directory; a damaged one lacks files.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "5").rename(broken / "checkpoints" / "5.orbax-checkpoint-tmp-1")
    assert export(broken, tmp_path / "out", "--step", 5) == 1
    assert "checkpoint 5 is incomplete" in error_of(capsys)
    shutil.rmtree(broken / "checkpoints" / "10" / "state" / "d")
    assert export(broken, tmp_path / "out") == 1
    assert "damaged" in error_of(capsys)
    assert not (tmp_path / "out").exists()
