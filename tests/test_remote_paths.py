"""gs:// paths work wherever local ones do: prepare-data, pretraining (data, checkpoints, logs,
the hf/ export), resume, `from_pretrained` and `bert-jax convert`, on a fake bucket, checked
against the same work done on local paths.

`etils.epath.testing.mock_epath` maps gs://bucket/... onto a local directory for everything
that goes through epath (bert_jax, Orbax's directory handling). Two libraries reach GCS from
C++ instead, and are pointed at that directory at their boundary: Orbax's TensorStore
(`gcs_utils.get_kvstore_for_gcs` gives a file kvstore) and Grain's ArrayRecord reader (it
gets the gs:// URLs bert_jax passes, recorded here, and reads the mapped files). Orbax's
hierarchical-namespace probe (a GCS API call) answers no. The test runs in an empty working
directory and checks that no `gs:/` path mangled into a local one was written there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import grain
import numpy as np
import pytest
from conftest import torch, transformers
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils
from test_pretrain import logged, pretrain

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict

_EPATH_CALLS = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
                "rename", "replace", "rmtree", "stat")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... -> files under the returned directory; `.read_urls` lists the gs://
    URLs given to the ArrayRecord reader."""
    root = tmp_path / "gcs"
    root.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    def local(path):
        text = os.fspath(path)
        return str(root / text.removeprefix("gs://")) if text.startswith("gs://") else text

    def remote(path):
        text = os.fspath(path)
        return "gs://" + os.path.relpath(text, root) if text.startswith(str(root)) else text

    def mapped(call, *args, **kwargs):
        return call(*map(local, args), **kwargs)

    calls = dict.fromkeys(_EPATH_CALLS, mapped)
    calls["glob"] = lambda call, pattern: [remote(p) for p in call(local(pattern))]
    calls["walk"] = lambda call, top, **kw: ((remote(folder), dirs, files)
                                             for folder, dirs, files in call(local(top), **kw))
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    read_urls, array_record_source = [], grain.sources.ArrayRecordDataSource

    def recording_source(paths):
        read_urls.extend(paths)
        return array_record_source([local(p) for p in paths])

    monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", recording_source)
    with epath_testing.mock_epath(**calls):
        yield SimpleNamespace(root=root / "bucket", read_urls=read_urls)
    assert not (work / "gs:").exists(), "a gs:// URL was used as a local path"


@pytest.mark.slow
def test_prepare_pretrain_resume_export_on_gcs(corpus, bucket):
    # prepare-data to gs:// writes what it writes locally (the corpus fixture's shards).
    for split in ("train", "eval"):
        assert main(["prepare-data", str(corpus / f"{split}.txt"), "--out",
                     f"gs://bucket/data/{split}", "--tokenizer", str(corpus / "tok"),
                     "--workers", "1", "--quiet"]) == 0
        manifest = json.loads((bucket.root / "data" / split / "manifest.json").read_text())
        assert manifest == json.loads((corpus / split / "manifest.json").read_text())
        for shard in manifest["shards"]:
            assert ((bucket.root / "data" / split / shard["path"]).read_bytes()
                    == (corpus / split / shard["path"]).read_bytes())
        assert not list((bucket.root / "data" / split / "shards").glob("*.tmp"))

    # Pretraining on gs:// data and run dir; then, as if preempted after the checkpoint of
    # step 10, resumed from gs://: the same params bit for bit, the same logged losses.
    on_gcs = ("data.train=gs://bucket/data/train", "data.eval=gs://bucket/data/eval")
    assert pretrain(corpus, "gs://bucket/runs/a", 20, *on_gcs) == 0
    assert bucket.read_urls and all(url.startswith("gs://bucket/data/") for url in bucket.read_urls)
    run = bucket.root / "runs" / "a"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]
    assert (run / "checkpoints" / "20" / "commit_success.txt").is_file()  # Orbax's GCS mode
    straight = read_state_dict(run / "hf")
    losses = {r["step"]: r["loss"] for r in logged(run) if "loss" in r}
    shutil.rmtree(run / "checkpoints" / "20")
    assert pretrain(corpus, "gs://bucket/runs/a", 20, *on_gcs, resume=True) == 0
    resumed = read_state_dict(run / "hf")
    assert resumed.keys() == straight.keys()
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
    records = logged(run)  # appended to across the restart
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 15, 20]
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == losses
    assert list((run / "tensorboard").iterdir()) and (run / "recipe.json").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = bert_jax.from_pretrained("gs://bucket/runs/a/hf")
    reference = transformers.BertForPreTraining.from_pretrained(run / "hf")
    assert model.config.architecture == reference.config.architectures[0]
    ids = np.array([[2, 50, 60, 70, 3]])
    np.testing.assert_allclose(
        np.asarray(model(ids).prediction_logits),
        reference(input_ids=torch.as_tensor(ids)).prediction_logits.detach().numpy(),
        atol=1e-4)


def test_convert_to_and_from_gcs(hf_dir, bucket, capsys):
    _, source = hf_dir("bert", "ForMaskedLM")
    assert main(["convert", str(source), "gs://bucket/models/orbax", "--quiet"]) == 0
    assert main(["convert", "gs://bucket/models/orbax", "gs://bucket/models/hf", "--quiet"]) == 0
    expected, actual = read_state_dict(Path(source)), read_state_dict(bucket.root / "models" / "hf")
    assert actual.keys() == expected.keys()
    assert all(np.array_equal(actual[k], expected[k]) for k in expected)
    transformers.BertForMaskedLM.from_pretrained(bucket.root / "models" / "hf")
    assert bert_jax.from_pretrained("gs://bucket/models/orbax").config.architecture \
        == "BertForMaskedLM"

    capsys.readouterr()
    assert main(["convert", "gs://bucket/models/missing", "gs://bucket/models/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gs://bucket/models/missing: no such directory" in err
    assert main(["convert", str(source), "gs://bucket/models/hf"]) == 1  # exists, no --overwrite
    assert "gs://bucket/models/hf: already exists" in capsys.readouterr().err
