"""The benchmark suite (`python -m benchmarks.run`) and the fill-mask benchmark on tiny models:
every row is produced, both sides run on the same weights and inputs (their MLM logits and
fill-mask predictions agree), bad input fails cleanly. Speed itself is never asserted."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from benchmarks import ours, peer, run
from bert_jax.convert.families import family_of_config
from bert_jax.modeling.presets import preset
from bert_jax.pretrained import PretrainedModel

TINY_SUITE = run.Suite("float32", ("tiny",), ("reference",), ("eager", "sdpa"),
                       (run.Workload("forward", 2, 16), run.Workload("variable", 2, 48, rows=3),
                        run.Workload("train", 2, 16)), warmup=0, iters=1)


@pytest.mark.slow  # 12-57 s on the shared 2-core CPU
def test_suite_rows_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(run.SUITES, "cpu", TINY_SUITE)
    out = tmp_path / "result.json"
    assert run.main(["--suite", "cpu", "--model", "tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "machine", "versions", "command", "rows"} <= set(result)
    assert [(r["model"], r["workload"]) for r in result["rows"]] == [
        ("tiny", "forward"), ("tiny", "variable"), ("tiny", "train")]
    for row in result["rows"]:
        names = [m["implementation"] for m in row["measurements"]]
        assert names == ["bert_jax (reference)"] + ["bert_jax (reference, all positions)"] * (
            row["workload"] == "train") + ["HF PyTorch (eager)", "HF PyTorch (sdpa)"]
        for m in row["measurements"]:
            assert "error" not in m, m
            assert math.isfinite(m["tokens_per_second"]) and m["tokens_per_second"] > 0
            assert math.isfinite(m["x_best_peer"])
    forward, variable, _ = result["rows"]
    assert forward["tokens"] == 2 * 16
    assert 3 * 32 <= variable["tokens"] <= 3 * 48  # real tokens, not padded
    # The peers ran our weights on our inputs.
    assert set(forward["max_abs_diff_logits"]) == {"eager", "sdpa"}
    assert max(forward["max_abs_diff_logits"].values()) < 1e-4
    table = capsys.readouterr().out
    assert table.count("| tiny |") == 10
    assert "max abs logits diff" in table


def test_peer_holds_our_weights(tmp_path):
    """Independently of the suite: the PyTorch peer loaded from bert_jax's save gives our
    logits on the same inputs, and padded right, the same logits on the real tokens."""
    config = preset("tiny")
    model = PretrainedModel(config, family_of_config(config).init_params(config, seed=3))
    model.save_pretrained(tmp_path / "hf")
    inputs = run.make_inputs(run.Workload("forward", 2, 12), config, seed=1)
    inputs["attention_mask"][1, 7:] = 0
    theirs = peer.logits(peer.load(tmp_path / "hf", "sdpa", "float32"), inputs)
    mine = np.asarray(model(**inputs).logits)
    real = inputs["attention_mask"] == 1
    np.testing.assert_allclose(mine[real], theirs[real], atol=1e-4, rtol=0)
    assert ours.forward(model, inputs)().shape == mine.shape


def test_gpt_bert_without_its_code_is_reported(tmp_path):
    """NorBERT 4's PyTorch peer needs its Hub code: the row says so instead of vanishing."""
    config = preset("norbert4-tiny")
    params = family_of_config(config).init_params(config)
    PretrainedModel(config, params).save_pretrained(tmp_path / "hf")
    suite = dataclasses.replace(TINY_SUITE, backends=(), peers=("sdpa",))
    row = run.run_workload("norbert4-tiny", run.Workload("forward", 1, 16), config, params,
                           tmp_path / "hf", suite, gpt_bert_code=None)
    [peer_row] = row["measurements"]
    assert peer_row["implementation"] == "HF PyTorch (sdpa)"
    assert "--gpt-bert-code" in peer_row["error"]


def test_unknown_model_is_one_error_line(capsys, tmp_path):
    out = tmp_path / "result.json"
    assert run.main(["--suite", "cpu", "--model", "nope", "--json", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m benchmarks.run: error: unknown preset")
    assert not out.exists()


def test_a_stopped_run_keeps_its_finished_rows(tmp_path, monkeypatch, capsys):
    """A device call that hits its time limit kills the suite mid-way: the JSON holds every
    row finished before, and `--show` prints their table."""
    monkeypatch.setitem(run.SUITES, "cpu", dataclasses.replace(
        TINY_SUITE, workloads=TINY_SUITE.workloads[:1] * 2))
    finished = []
    measure = run.run_workload

    def killed_on_the_second_row(*args):
        if finished:
            raise KeyboardInterrupt  # as SIGINT / a time limit stops it
        finished.append(measure(*args))
        return finished[-1]

    monkeypatch.setattr(run, "run_workload", killed_on_the_second_row)
    out = tmp_path / "result.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--suite", "cpu", "--model", "tiny", "--peer", "sdpa", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(finished))
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no partial file left
    capsys.readouterr()
    assert run.main(["--show", str(out)]) == 0
    assert capsys.readouterr().out.count("| tiny | forward |") == 2  # ours and --peer sdpa


def test_show_rejects_other_files(tmp_path, capsys):
    other = tmp_path / "config.json"
    other.write_text('{"rows": []}')
    assert run.main(["--show", str(other)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"python -m benchmarks.run: error: {other}: not a result of python -m benchmarks.run")
    assert run.main(["--show", str(tmp_path / "missing.json")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_flax_bert_comparison_needs_transformers_4_57():
    """benchmarks.flax_bert runs in a transformers 4.57 environment; under v5 it says so."""
    from benchmarks import flax_bert

    with pytest.raises(SystemExit, match="has no Flax BERT: run this with transformers 4.57"):
        flax_bert.main(["--model", "tiny", "--rounds", "1"])


@pytest.mark.slow  # about 15 s
def test_fill_mask_benchmark_agrees_with_the_pipeline(capsys):
    """benchmarks.fill_mask: both rows, and transformers' pipeline ranks the same token first
    at every mask."""
    from benchmarks import fill_mask

    fill_mask.main(["--model", "tiny", "--texts", "6", "--batch-size", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "| bert_jax fill_mask |" in out and "| transformers pipeline |" in out
    assert "same top token at every mask: yes" in out
