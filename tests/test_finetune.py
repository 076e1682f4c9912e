"""`bert-jax finetune`: training-step parity with transformers PyTorch, runs end to end on tiny
local files (classification, NER, SQuAD, multiple choice; BERT, Megatron-BERT, GPT-BERT; one
and four devices) with the best model exported and checked in transformers, resume after a
preemption, the card recipes' data sources, and bad input."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    NORBERT4_TINY,
    finish,
    make_hf_model,
    save_hf_model,
    start_cli,
    start_two_processes,
    torch,
    transformers,
)

import bert_jax
from bert_jax.cli import main
from bert_jax.convert.weight_files import read_state_dict
from bert_jax.data.answer_spans import squad_predictions
from bert_jax.data.batching import batches, bucket_lengths
from bert_jax.data.squad import prepare_features, read_squad
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.training import run_log
from bert_jax.training.finetune import FinetuneRecipe
from bert_jax.training.metrics import squad_metrics, token_classification_metrics
from bert_jax.training.recipe import load_recipe
from bert_jax.training.tasks import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PEOPLE = ["anna", "bob", "carl", "dora", "erik", "fay"]
PLACES = ["oslo", "rome", "lima", "kyiv", "bonn", "riga"]
FILLER = ["went", "to", "met", "in", "lives", "near", "saw", "the", "a", "city", "today",
          "where", "does", "live", "who", "good", "bad", "fun", "dull", "film", "was", "very"]
WORDS = PEOPLE + PLACES + FILLER + ["new", "##s"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def add_tokenizer(model_dir: Path) -> Path:
    """A WordPiece vocabulary of whole words (ids < 99, the tiny models' vocab size)."""
    (model_dir / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return model_dir


def tiny_model(path: Path, head: str, model_type: str = "bert", **config) -> Path:
    """A tiny random transformers BERT (or Megatron-BERT) with dropout off, saved with a
    tokenizer."""
    model = make_hf_model(model_type, head, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **config)
    return add_tokenizer(Path(save_hf_model(model, path)))


def write_classification(path: Path, n: int, seed: int) -> Path:
    """Film reviews whose label the adjective gives."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        adjective = rng.choice(["good", "fun"] if label == "pos" else ["bad", "dull"])
        rows.append(f"the film was {rng.choice(['very ', ''])}{adjective},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_conll(path: Path, n: int, seed: int) -> Path:
    """Sentences whose entities (people, places) the words give, in IOB2; some names are two
    words ("new oslo") or two word pieces ("annas")."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- O", ""]
    for _ in range(n):
        place = [(rng.choice(PLACES), "B-LOC")]
        if rng.random() < 0.3:
            place = [("new", "B-LOC"), (place[0][0], "I-LOC")]
        words = [(rng.choice(PEOPLE) + rng.choice(["", "s"]), "B-PER"),
                 (rng.choice(["went", "lives"]), "O"), (rng.choice(["to", "near"]), "O"), *place]
        if rng.random() < 0.5:
            words += [("met", "O"), (rng.choice(PEOPLE), "B-PER")]
        lines += [f"{word} {tag}" for word, tag in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_squad(path: Path, n: int, seed: int) -> Path:
    """Who lives where: the answer is the place named after the person asked about."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        people = rng.sample(PEOPLE, 2)
        places = rng.sample(PLACES, 2)
        context = f"{people[0]} lives in {places[0]} . {people[1]} lives in {places[1]} ."
        asked = rng.randrange(2)
        start = context.index(f"{people[asked]} lives in ") + len(f"{people[asked]} lives in ")
        paragraphs.append({"context": context, "qas": [{
            "id": f"q{i}", "question": f"where does {people[asked]} live ?",
            "answers": [{"text": places[asked], "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t",
                                                            "paragraphs": paragraphs}]}))
    return path


def write_swag(path: Path, n: int, seed: int) -> Path:
    """Which ending fits: the one that names a place."""
    rng = random.Random(seed)
    rows = ["sent1,sent2,ending0,ending1,ending2,ending3,label"]
    for _ in range(n):
        endings = [f"{rng.choice(FILLER)} {rng.choice(FILLER)}" for _ in range(4)]
        label = rng.randrange(4)
        endings[label] = f"to {rng.choice(PLACES)}"
        rows.append(f"{rng.choice(PEOPLE)} went,{rng.choice(['then', 'today'])},"
                    f"{','.join(endings)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def finetune_args(config: str, *sets: str) -> list[str]:
    args = ["finetune", "--config", str(CONFIGS / config), "--quiet"]
    for item in sets:
        args += ["--set", item]
    return args


def finetune(config: str, *sets: str, resume: bool = False) -> int:
    return main(finetune_args(config, *sets) + (["--resume"] if resume else []))


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses_of(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in logged(run) if "loss" in r}


# --- training-step parity with transformers ----------------------------------------------------

PARITY = dict(learning_rate=2e-3, warmup_steps=3, weight_decay=0.01, eps=1e-6, steps=20,
              batch_size=8)


def torch_losses(model, batches_) -> list[float]:
    """transformers PyTorch on the same batches: AdamW with the Trainer's weight-decay groups
    (no decay on biases and LayerNorm weights) and its linear warmup/decay schedule."""
    model.train()
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay],
               "weight_decay": PARITY["weight_decay"]},
              {"params": [p for n, p in model.named_parameters() if n not in decay],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=PARITY["learning_rate"], betas=(0.9, 0.999),
                                  eps=PARITY["eps"])
    schedule = transformers.get_linear_schedule_with_warmup(
        optimizer, PARITY["warmup_steps"], PARITY["steps"])
    losses = []
    for batch in batches_:
        inputs = {k: torch.as_tensor(batch[k]).long()
                  for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("config,head,write,labels", [
    ("finetune-tiny-classification.yaml", "ForSequenceClassification", write_classification, 2),
    ("finetune-tiny-ner.yaml", "ForTokenClassification", write_conll, 4),
])
def test_training_step_parity_with_transformers(tmp_path, config, head, write, labels):
    """20 steps of `bert-jax finetune` (dropout off, no clipping) log the losses transformers
    PyTorch gives for the same model, batches and AdamW settings, to 1e-4."""
    model_dir = tiny_model(tmp_path / "model", head, num_labels=labels)
    train = write(tmp_path / ("train.conll" if "ner" in config else "train.csv"), 64, seed=0)
    run = tmp_path / "run"
    sets = [f"model.init_from={model_dir}", f"data.train={train}", "data.eval=null",
            f"train.output_dir={run}", f"train.steps={PARITY['steps']}",
            f"train.batch_size={PARITY['batch_size']}", "train.log_every=1",
            f"optimizer.learning_rate={PARITY['learning_rate']}",
            f"optimizer.warmup_steps={PARITY['warmup_steps']}",
            f"optimizer.weight_decay={PARITY['weight_decay']}", f"optimizer.eps={PARITY['eps']}",
            "optimizer.clip_norm=null"]
    assert finetune(config, *sets) == 0

    recipe = load_recipe(CONFIGS / config, sets, FinetuneRecipe)
    prepared = recipe.data.prepare(load_tokenizer(model_dir))
    stream = batches(prepared.train, batch_size=PARITY["batch_size"],
                     buckets=bucket_lengths(recipe.data.max_seq_length), pad_id=0,
                     seed=recipe.train.seed, num_epochs=None, drop_remainder=True)
    torch_model = getattr(transformers, "Bert" + head).from_pretrained(model_dir)
    expected = torch_losses(torch_model, [next(stream) for _ in range(PARITY["steps"])])
    got = losses_of(run)
    assert sorted(got) == list(range(1, PARITY["steps"] + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], expected, atol=1e-4, rtol=0)
    assert expected[-1] < expected[0]  # it trained: the comparison covers real updates


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_ner_end_to_end_on_4_devices_keeps_and_exports_the_best(tmp_path):
    """Trains on a data x fsdp mesh of 4 devices, evaluates every epoch (the eval batches split
    over the devices, the last one padded), and exports the best epoch's model: transformers
    loads it with the data's labels, and its own predictions score the best logged F1."""
    model_dir = tiny_model(tmp_path / "model", "ForMaskedLM")  # a pretrained encoder, no head
    train = write_conll(tmp_path / "train.conll", 96, 0)
    dev = write_conll(tmp_path / "dev.conll", 40, 1)
    run = tmp_path / "run"
    finish([start_cli(finetune_args(
        "finetune-tiny-ner.yaml", f"model.init_from={model_dir}", f"data.train={train}",
        f"data.eval={dev}", f"train.output_dir={run}", "train.epochs=4", "mesh.data=2",
        "mesh.fsdp=2"), 4)])
    evals = [r for r in logged(run) if "eval_f1" in r]
    assert [r["step"] for r in evals] == [6, 12, 18, 24]  # 96 sentences / 16 a batch, 4 epochs
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    best = max(evals, key=lambda r: r["eval_f1"])  # the first of equals
    assert best["eval_f1"] > 0.7
    assert logged(run)[-1] == {"step": 24, "best_step": best["step"],
                               "best_metric": best["eval_f1"]}

    model = transformers.AutoModelForTokenClassification.from_pretrained(run / "hf")
    labels = ["B-LOC", "B-PER", "I-LOC", "O"]
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {label: i for i, label in enumerate(labels)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    sentences = [block.split("\n") for block in dev.read_text().split("\n\n")[1:] if block.strip()]
    words = [[line.split()[0] for line in s] for s in sentences]
    tags = [[line.split()[1] for line in s] for s in sentences]
    encoded = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits.argmax(-1).numpy()
    aligned = np.full(predicted.shape, -100)
    for row, sentence_tags in enumerate(tags):
        previous = None
        for column, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                aligned[row, column] = labels.index(sentence_tags[word])
            previous = word
    f1 = token_classification_metrics(predicted, aligned, labels)["f1"]
    assert f1 == pytest.approx(best["eval_f1"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """NER fine-tuning as 2 processes x 2 simulated devices (jax.distributed over gloo) logs
    the losses and eval metrics of 1 process x 4 devices on the same data, and exports the
    same weights, gathered from both processes."""
    model_dir = tiny_model(tmp_path / "model", "ForMaskedLM")
    train = write_conll(tmp_path / "train.conll", 64, 0)
    dev = write_conll(tmp_path / "dev.conll", 20, 1)  # the last eval batch padded

    def args(run: Path) -> list[str]:
        return finetune_args("finetune-tiny-ner.yaml", f"model.init_from={model_dir}",
                             f"data.train={train}", f"data.eval={dev}", f"train.output_dir={run}",
                             "train.epochs=2", "train.log_every=1", "mesh.data=2", "mesh.fsdp=2")

    finish([start_cli(args(tmp_path / "one"), 4)])
    finish(start_two_processes(args(tmp_path / "two"), 2))

    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for expected, got in zip(one, two):
        assert got.keys() == expected.keys()
        for key in expected.keys() - {"tokens_per_second"}:  # the rest is the same run's
            assert got[key] == pytest.approx(expected[key], abs=1e-5), (expected["step"], key)
    assert len(losses_of(tmp_path / "two")) == 8  # 64 sentences / 16 a batch, 2 epochs
    expected = read_state_dict(tmp_path / "one" / "hf")
    got = read_state_dict(tmp_path / "two" / "hf")
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_preempted_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM after step 7 saves and stops (no export); --resume ends with the params, losses
    and best model of a run that was never stopped."""
    model_dir = tiny_model(tmp_path / "model", "ForSequenceClassification", num_labels=2)
    train = write_classification(tmp_path / "train.csv", 64, 0)
    dev = write_classification(tmp_path / "dev.csv", 24, 1)

    def run(name: str, resume: bool = False) -> int:
        return finetune("finetune-tiny-classification.yaml", f"model.init_from={model_dir}",
                        f"data.train={train}", f"data.eval={dev}",
                        f"train.output_dir={tmp_path / name}", "train.epochs=3",
                        "train.batch_size=8", "train.log_every=1", "train.eval_every=5",
                        "train.save_every=10", resume=resume)

    assert run("straight") == 0
    write = run_log.RunLog.write

    def preempt_after_step_7(self, metrics):
        write(self, metrics)
        if metrics["step"] == 7 and "loss" in metrics:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(run_log.RunLog, "write", preempt_after_step_7)
        assert run("stopped") == 0
    stopped = tmp_path / "stopped"
    assert not (stopped / "hf").exists() and (stopped / "checkpoints" / "7").is_dir()
    # The stopped run's step exports as a model transformers loads (warmup_ratio's schedule
    # cannot be rebuilt without the data, and need not be).
    assert main(["export", str(stopped), str(tmp_path / "step7"), "--step", "7"]) == 0
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "step7")
    assert exported.config.id2label == {0: "neg", 1: "pos"}
    assert run("stopped") == 1  # checkpoints there: only with --resume
    assert run("stopped", resume=True) == 0
    assert losses_of(stopped) == losses_of(tmp_path / "straight")
    assert logged(stopped)[-1] == logged(tmp_path / "straight")[-1]  # the same best
    straight = read_state_dict(tmp_path / "straight" / "hf")
    resumed = read_state_dict(stopped / "hf")
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    config = transformers.AutoConfig.from_pretrained(stopped / "hf")
    assert config.id2label == {0: "neg", 1: "pos"}
    assert config.problem_type == "single_label_classification"


@pytest.mark.slow
def test_question_answering_end_to_end(tmp_path):
    """Megatron-BERT on SQuAD JSON, contexts longer than max_seq_length read in windows with a
    stride; the exported model, run by transformers and decoded, scores the best logged EM
    and F1."""
    model_dir = tiny_model(tmp_path / "model", "ForQuestionAnswering", "megatron-bert")
    train = write_squad(tmp_path / "train.json", 64, 0)
    dev = write_squad(tmp_path / "dev.json", 16, 1)
    run = tmp_path / "run"
    assert finetune("finetune-tiny-squad.yaml", f"model.init_from={model_dir}",
                    f"data.train={train}", f"data.eval={dev}", f"train.output_dir={run}",
                    "data.max_seq_length=16", "data.doc_stride=4", "train.epochs=2") == 0
    evals = [r for r in logged(run) if "eval_f1" in r]
    assert len(evals) == 2 and "eval_loss" in evals[-1]
    best = max(evals, key=lambda r: r["eval_f1"])

    model = transformers.AutoModelForQuestionAnswering.from_pretrained(run / "hf")
    assert model.config.architectures == ["MegatronBertForQuestionAnswering"]
    examples = read_squad(dev)
    features = prepare_features(examples, load_tokenizer(run / "hf"), max_length=16,
                                doc_stride=4)
    assert len(features) > len(examples)  # windows
    start, end = [], []
    with torch.no_grad():
        for f in features:
            out = model(**{k: torch.tensor([v]) for k, v in (
                ("input_ids", f.encoding.ids), ("token_type_ids", f.encoding.type_ids),
                ("attention_mask", f.encoding.attention_mask))})
            start.append(out.start_logits[0].numpy())
            end.append(out.end_logits[0].numpy())
    predictions = squad_predictions(examples, features, start, end, max_answer_length=10)
    scores = squad_metrics(examples, predictions)
    assert scores["f1"] == pytest.approx(best["eval_f1"], abs=1e-4)
    assert scores["exact_match"] == pytest.approx(best["eval_exact_match"], abs=1e-4)


@pytest.mark.slow
def test_multiple_choice_end_to_end(tmp_path):
    """SWAG-style CSV in; the exported model, run by transformers on choices encoded by its
    own tokenizer as run_swag does, scores the best logged accuracy."""
    model_dir = tiny_model(tmp_path / "model", "ForMultipleChoice")
    train = write_swag(tmp_path / "train.csv", 64, 0)
    dev = write_swag(tmp_path / "dev.csv", 24, 1)
    run = tmp_path / "run"
    assert finetune("finetune-tiny-swag.yaml", f"model.init_from={model_dir}",
                    f"data.train={train}", f"data.eval={dev}", f"train.output_dir={run}",
                    "train.epochs=3") == 0
    evals = [r for r in logged(run) if "eval_accuracy" in r]
    best = max(evals, key=lambda r: r["eval_accuracy"])

    model = transformers.AutoModelForMultipleChoice.from_pretrained(run / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    rows = [line.split(",") for line in dev.read_text().splitlines()[1:]]
    first = [row[0] for row in rows for _ in range(4)]
    second = [f"{row[1]} {ending}" for row in rows for ending in row[2:6]]
    encoded = tokenizer(first, second, truncation=True, max_length=64, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v.view(len(rows), 4, -1) for k, v in encoded.items()}).logits
    accuracy = float(np.mean(logits.argmax(-1).numpy() == [int(row[6]) for row in rows]))
    assert accuracy == pytest.approx(best["eval_accuracy"])


@pytest.mark.slow
def test_gpt_bert_with_a_mismatched_head_reinitialised(tmp_path, caplog):
    """GPT-BERT (it takes no token_type_ids) from a 3-label checkpoint on a 2-label task: with
    model.ignore_mismatched_sizes the head is initialised afresh, with a warning, and trained;
    the export has the task's labels."""
    model_dir = tmp_path / "norbert"
    shutil.copytree(NORBERT4_TINY / "sequence_classification", model_dir)
    add_tokenizer(model_dir)
    train = write_classification(tmp_path / "train.csv", 32, 0)
    run = tmp_path / "run"
    assert finetune("finetune-tiny-classification.yaml", f"model.init_from={model_dir}",
                    f"data.train={train}", f"data.eval={train}", f"train.output_dir={run}",
                    "train.epochs=1", "model.ignore_mismatched_sizes=true") == 0
    assert "shapes did not match" in caplog.text and "classifier" in caplog.text
    exported = bert_jax.from_pretrained(run / "hf")
    assert exported.config.architecture == "GptBertForSequenceClassification"
    assert exported.config.labels == ("neg", "pos")
    assert exported.config.problem_type == "single_label_classification"
    source, tuned = read_state_dict(model_dir), read_state_dict(run / "hf")
    assert any(not np.array_equal(source[k], tuned[k]) for k in source if k.startswith("embedding"))


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_eval_scores_multi_label_and_regression_as_torch(tmp_path, problem_type):
    """The eval loss is the loss transformers computes for the problem type (BCE with logits,
    MSE) over the split; the metrics are the problem type's, headline first."""
    rng = np.random.default_rng(0)
    model_dir = add_tokenizer(tmp_path)
    rows = [{"text": "the film was good", "fun": int(rng.integers(2)),
             "dull": int(rng.integers(2)), "score": float(rng.normal())} for _ in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    multi = problem_type == "multi_label_classification"
    task = ClassificationTask(train=str(data), eval=str(data), text_column="text",
                              label_column=["fun", "dull"] if multi else "score")
    prepared = task.prepare(load_tokenizer(model_dir))
    assert prepared.problem_type == problem_type
    logits = rng.normal(size=(len(rows), 2 if multi else 1)).astype(np.float32)
    scores = prepared.score({"logits": list(logits)})
    labels = torch.tensor([[row["fun"], row["dull"]] if multi else row["score"] for row in rows])
    if multi:
        expected = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), labels.float())
    else:
        expected = torch.nn.MSELoss()(torch.tensor(logits).squeeze(), labels.float())
    assert scores["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert list(scores)[1:] == (["f1_micro", "f1_macro", "accuracy"] if multi
                                else ["pearson", "spearmanr"])


# --- shipped recipes ---------------------------------------------------------------------------

def tfds_records(config: str):
    """Rows as tensorflow-datasets' data source gives them (bytes, arrays, class ids), for the
    datasets whose random mock rows are not valid examples (SQuAD answers, CoNLL tags)."""
    if "squad" in config:
        context = "anna lives in oslo . bob lives in rome ."
        return [{"id": f"q{i}".encode(), "title": b"t", "context": context.encode(),
                 "question": f"where does {name} live ?".encode(),
                 "answers": {"text": np.array([place.encode()]),
                             "answer_start": np.array([context.index(place)], np.int32)}}
                for i, (name, place) in enumerate((("anna", "oslo"), ("bob", "rome")))]
    if "conll" in config:  # class ids of conll2003's ner: O, B-PER, I-PER, B-ORG, I-ORG, B-LOC
        return [{"tokens": np.array([b"anna", b"lives", b"in", b"oslo"]),
                 "pos": np.zeros(4, np.int64), "chunks": np.zeros(4, np.int64),
                 "ner": np.array([1, 0, 0, 5])}] * 2
    return None


@pytest.mark.parametrize("config,metrics", [
    ("finetune-sst2.yaml", ("accuracy",)), ("finetune-mnli.yaml", ("accuracy",)),
    ("finetune-conll2003-ner.yaml", ("f1", "precision", "recall", "accuracy")),
    ("finetune-squad.yaml", ("f1", "exact_match"))])
def test_tfds_recipes_read_their_data(tmp_path, config, metrics):
    """The card recipes' tensorflow-datasets sources, mocked, read into train and eval
    features with the task's metrics (headline first)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    model_dir = tiny_model(tmp_path / "model", "ForMaskedLM")
    recipe = load_recipe(CONFIGS / config, [f"model.init_from={model_dir}"], FinetuneRecipe)
    assert recipe.train.batch_size == 32 and recipe.optimizer.warmup_ratio == 0.1
    records = tfds_records(config)
    mock = {} if records is None else dict(as_data_source_fn=lambda *args, **kwargs: records)
    with tfds.testing.mock_data(num_examples=4, **mock):
        prepared = recipe.data.prepare(load_tokenizer(model_dir))
    assert len(prepared.train) >= 2 and len(prepared.eval) >= 2
    assert prepared.metrics == metrics


# --- bad input ---------------------------------------------------------------------------------

def bad_classification_eval(tmp_path):
    (tmp_path / "dev.csv").write_text("text,label\nthe film was good,pos\nthe film,meh\n")
    return "finetune-tiny-classification.yaml", [f"data.eval={tmp_path / 'dev.csv'}"], \
        f"{tmp_path / 'dev.csv'}:3: label 'meh' is not in the label map (neg, pos)"


def malformed_conll(tmp_path):
    conll = write_conll(tmp_path / "train.conll", 4, 0)
    lines = conll.read_text().splitlines()
    lines[4] += " extra"
    conll.write_text("\n".join(lines) + "\n")
    return "finetune-tiny-ner.yaml", [f"data.train={conll}"], \
        f"{conll}:5: malformed line: 3 columns where the file has 2"


def answer_outside_context(tmp_path):
    squad = write_squad(tmp_path / "train.json", 2, 0)
    squad.write_text(squad.read_text().replace('"answer_start": ', '"answer_start": 1'))
    return "finetune-tiny-squad.yaml", [f"data.train={squad}"], "is not in its context"


def mismatched_head(tmp_path):
    model_dir = tiny_model(tmp_path / "ner_model", "ForTokenClassification", num_labels=5)
    return "finetune-tiny-classification.yaml", [f"model.init_from={model_dir}"], (
        "its BertForTokenClassification head does not fit this task's "
        "BertForSequenceClassification with 2 outputs (classifier.weight has shape (5, 32) "
        "there, (2, 32) here); set model.ignore_mismatched_sizes=true")


@pytest.mark.parametrize("case", [bad_classification_eval, malformed_conll,
                                  answer_outside_context, mismatched_head])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    model_dir = tiny_model(tmp_path / "model", "ForSequenceClassification", num_labels=2)
    train = write_classification(tmp_path / "train.csv", 16, 0)
    run = tmp_path / "run"
    config, sets, expected = case(tmp_path)
    capsys.readouterr()
    assert finetune(config, f"model.init_from={model_dir}", f"data.train={train}",
                    "data.eval=null", f"train.output_dir={run}", *sets) == 1
    err = capsys.readouterr().err
    assert err.startswith("bert-jax: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not run.exists()
