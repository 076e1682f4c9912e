"""Packing for fine-tuning (`data.pack`): packed rows give each example exactly what it gets
alone (logits, loss, gradients; BERT, Megatron-BERT and GPT-BERT), a packed `bert-jax finetune`
run trains and scores its eval split per example as transformers does on its export, and
packing wastes far less than padding to buckets."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import NORBERT4_TINY, make_hf_model, save_hf_model, torch, transformers
from test_finetune import finetune, logged, tiny_model, write_classification

import bert_jax
from bert_jax.data.batching import Features, batches, bucket_lengths, pad_rows
from bert_jax.data.masking import IGNORE_INDEX
from bert_jax.data.packing import efficiency, pack, packed_batches, packed_rows
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.training.metrics import compute_metrics

HEADS = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}


def random_features(kind: str, n: int, num_labels: int, vocab: int, seed: int = 0,
                    lengths=(3, 20), problem_type: str = "single_label_classification"
                    ) -> Features:
    """`n` examples of random lengths, token types 0 then 1, and labels of `kind`."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*lengths, n)
    ids = [rng.integers(5, vocab, size).astype(np.int32) for size in sizes]
    types = [(np.arange(size) >= size // 2).astype(np.int32) for size in sizes]
    if kind == "token":
        labels = [np.where(rng.random(size) < 0.7, rng.integers(0, num_labels, size),
                           IGNORE_INDEX).astype(np.int32) for size in sizes]
    elif problem_type == "regression":
        labels = rng.normal(size=n).astype(np.float32)
    elif problem_type == "multi_label_classification":
        labels = (rng.random((n, num_labels)) < 0.4).astype(np.float32)
    else:
        labels = rng.integers(0, num_labels, n).astype(np.int32)
    return Features(ids, types, labels)


def both_layouts(features: Features, max_length: int, pad_id: int, types: bool = True):
    """(the examples padded one a row, the same packed) as model inputs with labels."""
    rows = pack([len(ids) for ids in features.input_ids], max_length)
    assert len(rows) < len(features)  # the test packs several examples into some rows
    padded = pad_rows(features, np.arange(len(features)), max_length, pad_id)
    packed = packed_rows(features, rows, max_length, pad_id, max(map(len, rows)))
    if not types:  # GPT-BERT takes no token types
        del padded["token_type_ids"], packed["token_type_ids"]
    return padded, packed


def inputs(batch: dict) -> dict:
    """A batch's model inputs (labels included): all but the example ids."""
    return {k: v for k, v in batch.items() if k != "example_id"}


def bert_or_gpt_bert(family: str, kind: str, tmp_path: Path, **config):
    """(bert_jax model, transformers model or None) of `family` with a `kind` head."""
    if family == "gpt-bert":
        directory = "sequence_classification" if kind == "sequence" else "token_classification"
        return bert_jax.from_pretrained(NORBERT4_TINY / directory), None
    torch_model = make_hf_model(family, HEADS[kind], **config)
    return bert_jax.from_pretrained(save_hf_model(torch_model, tmp_path / "hf")), torch_model


def per_example(out: np.ndarray, batch: dict, features: Features, kind: str) -> list[np.ndarray]:
    """Each example's logits, in example order, read from a batch of either layout."""
    rows = [None] * len(features)
    if "segment_ids" not in batch:
        for index in range(len(features)):
            n = len(features.input_ids[index])
            rows[index] = out[index] if kind == "sequence" else out[index, :n]
        return rows
    for row, slots in enumerate(batch["example_id"]):
        for segment, index in enumerate(slots):
            if index >= 0:
                span = batch["segment_ids"][row] == segment + 1
                rows[index] = out[row, segment] if kind == "sequence" else out[row, span]
    return rows


@pytest.mark.parametrize("family,kind,problem_type", [
    ("bert", "sequence", "single_label_classification"),
    ("bert", "sequence", "multi_label_classification"),
    ("bert", "sequence", "regression"),
    ("bert", "token", None),
    ("megatron-bert", "sequence", "single_label_classification"),
    ("gpt-bert", "sequence", "single_label_classification"),
    ("gpt-bert", "token", None),
])
def test_packed_rows_give_each_example_what_it_gets_alone(tmp_path, family, kind, problem_type):
    """One packed batch (segments, per-segment positions, each segment's [CLS]) gives every
    example the logits it gets padded alone, and the loss (transformers' mean over examples,
    or over labelled tokens) and gradients of the same examples padded in one batch; padded,
    those are transformers' own logits and loss for BERT and Megatron-BERT."""
    num_labels = 1 if problem_type == "regression" else 3
    config = {} if family == "gpt-bert" else dict(num_labels=num_labels,
                                                  problem_type=problem_type)
    model, torch_model = bert_or_gpt_bert(family, kind, tmp_path, **config)
    c = model.config
    features = random_features(kind, 12, c.num_labels, c.vocab_size,
                               problem_type=problem_type or "")
    padded, packed = both_layouts(features, 48, c.pad_token_id, types=torch_model is not None)

    def loss(params, batch):
        out = model.module.apply({"params": params}, **inputs(batch))
        return out.loss, out.logits

    loss = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss_padded, logits_padded), grads_padded = loss(model.params, padded)
    (loss_packed, logits_packed), grads_packed = loss(model.params, packed)
    alone = per_example(np.asarray(logits_padded), padded, features, kind)
    in_rows = per_example(np.asarray(logits_packed), packed, features, kind)
    for a, b in zip(in_rows, alone):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                 grads_packed, grads_padded)
    if torch_model is not None:
        with torch.no_grad():
            reference = torch_model(**{k: torch.as_tensor(v.astype(np.int64) if v.dtype == np.int32
                                                          else v)
                                       for k, v in inputs(padded).items()})
        for a, b in zip(alone, per_example(reference.logits.numpy(), padded, features, kind)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        np.testing.assert_allclose(loss_packed, reference.loss.item(), rtol=1e-5)


def test_packed_rows_hold_each_example_once_laid_out_alone():
    """Every example sits whole in one segment, with its own token types, labels and positions
    from 0; no row overflows; the layout depends on the lengths only (deterministic)."""
    features = random_features("token", 200, 5, 99, lengths=(2, 40))
    lengths = [len(ids) for ids in features.input_ids]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(features)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert pack(lengths, 64) == rows
    batch = packed_rows(features, rows, 64, 0, max(map(len, rows)))
    for row, slots in enumerate(batch["example_id"]):
        for segment, index in enumerate(slots[slots >= 0]):
            span = batch["segment_ids"][row] == segment + 1
            np.testing.assert_array_equal(batch["input_ids"][row, span], features.input_ids[index])
            np.testing.assert_array_equal(batch["token_type_ids"][row, span],
                                          features.token_type_ids[index])
            np.testing.assert_array_equal(batch["labels"][row, span], features.labels[index])
            np.testing.assert_array_equal(batch["position_ids"][row, span], np.arange(span.sum()))
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)


def test_packing_wastes_far_less_than_padding_to_buckets():
    """SST-2-like lengths (5..60 tokens, most short) at max_length 128: padding each batch to
    its bucket computes mostly padding, packing almost none."""
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(18), 0.6, 2000), 5, 60).astype(int)
    features = Features([np.ones(n, np.int32) for n in sizes],
                        [np.zeros(n, np.int32) for n in sizes], np.zeros(len(sizes), np.int32))
    padded = batches(features, batch_size=32, buckets=bucket_lengths(128), pad_id=0, seed=0)
    padded_real = np.mean(np.concatenate([b["attention_mask"].ravel() for b in padded]))
    rows = pack(sizes, 128)
    packed_real = efficiency(sizes, rows, 128)
    epoch = packed_batches(features, rows, batch_size=8, max_length=128, pad_id=0, seed=0)
    masks = np.concatenate([b["attention_mask"].ravel() for b in epoch])
    assert masks.sum() == sizes.sum()  # every token once in an epoch
    np.testing.assert_allclose(packed_real, masks.sum() / (len(rows) * 128))
    assert packed_real > 0.95
    assert (1 - padded_real) > 5 * (1 - packed_real)


def test_packed_batches_shuffle_by_seed_every_epoch_and_resume_exactly():
    """Rows are reshuffled each epoch by the seed, every example once an epoch; a restored
    iterator state continues with the very same batches."""
    features = random_features("sequence", 90, 3, 99, lengths=(2, 30))
    rows = pack([len(ids) for ids in features.input_ids], 48)

    def stream(seed=1):
        return packed_batches(features, rows, batch_size=4, max_length=48, pad_id=0, seed=seed,
                              num_epochs=None, drop_remainder=True)

    per_epoch = len(rows) // 4
    run = stream()
    first = [next(run) for _ in range(per_epoch)]
    second = [next(run) for _ in range(per_epoch)]
    seen = np.concatenate([b["example_id"].ravel() for b in first])
    assert len(set(seen[seen >= 0])) == len(seen[seen >= 0])
    assert [b["example_id"].tolist() for b in first] != [b["example_id"].tolist() for b in second]
    np.testing.assert_array_equal(next(stream())["example_id"], first[0]["example_id"])
    assert not np.array_equal(next(stream(seed=2))["example_id"], first[0]["example_id"])
    resumed, again = stream(), stream()
    for _ in range(3):
        next(resumed)
    state = json.loads(json.dumps(resumed.get_state()))
    again.set_state(state)
    for _ in range(per_epoch):
        a, b = next(resumed), next(again)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_packed_finetune_trains_and_scores_each_eval_example(tmp_path, capsys):
    """`bert-jax finetune` with data.pack=true: the loss falls, the packing efficiency is
    logged and printed, and the (unpacked) eval accuracy of the best model is what
    transformers' predictions on the exported model score on the dev set."""
    model_dir = tiny_model(tmp_path / "model", "ForSequenceClassification", num_labels=2)
    train = write_classification(tmp_path / "train.csv", 128, 0)
    dev = write_classification(tmp_path / "dev.csv", 40, 1)
    run = tmp_path / "run"
    assert finetune("finetune-tiny-classification.yaml", f"model.init_from={model_dir}",
                    f"data.train={train}", f"data.eval={dev}", f"train.output_dir={run}",
                    "data.pack=true", "train.batch_size=2", "train.epochs=5",
                    "train.log_every=1") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = logged(run)
    lengths = [len(e.ids) for e in load_tokenizer(model_dir).backend.encode_batch(
        [line.rsplit(",", 1)[0] for line in train.read_text().splitlines()[1:]])]
    rows = pack(lengths, 64)
    assert records[0] == {"step": 0, "packing_efficiency": efficiency(lengths, rows, 64)}
    assert printed["packing_efficiency"] == records[0]["packing_efficiency"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 5 * (len(rows) // 2)  # an epoch is the packed rows
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"]

    best = max(evals, key=lambda r: r["eval_accuracy"])  # the first of equals
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(run / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    texts, labels = zip(*(line.rsplit(",", 1) for line in dev.read_text().splitlines()[1:]))
    with torch.no_grad():
        logits = exported(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits
    predicted = logits.argmax(-1).numpy()
    expected = np.array([exported.config.label2id[label] for label in labels])
    accuracy = compute_metrics(("accuracy",), predicted, expected)["accuracy"]
    assert accuracy == pytest.approx(best["eval_accuracy"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(expected)).item()
    assert loss == pytest.approx(best["eval_loss"], abs=1e-5)
    assert best["eval_accuracy"] > 0.9


@pytest.mark.parametrize("config,sets,expected", [
    ("finetune-tiny-classification.yaml",
     ["dp.clip_norm=1.0", "dp.delta=1e-5", "dp.noise_multiplier=1.0"],
     "data.pack: DP-SGD draws single examples"),
    ("finetune-tiny-squad.yaml", [], "unknown key 'pack'"),
    ("finetune-tiny-swag.yaml", [], "unknown key 'pack'"),
])
def test_packing_where_it_cannot_be_is_one_line(tmp_path, capsys, config, sets, expected):
    """Packing with DP-SGD (which samples single examples) or for a task without packed rows
    (QA, multiple choice) ends with one error line and writes nothing."""
    model_dir = tiny_model(tmp_path / "model", "ForSequenceClassification", num_labels=2)
    train = write_classification(tmp_path / "train.csv", 16, 0)
    run = tmp_path / "run"
    capsys.readouterr()
    assert finetune(config, f"model.init_from={model_dir}", f"data.train={train}",
                    "data.eval=null", f"train.output_dir={run}", "data.pack=true", *sets) == 1
    err = capsys.readouterr().err
    assert err.startswith("bert-jax: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not run.exists()
