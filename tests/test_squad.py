"""SQuAD data for extractive QA: reading v1.1 / v2.0 files, run_qa.py-style features against
the same preprocessing done with the `transformers` tokenizer, span decoding into answers,
EM / F1 against the official evaluation scripts' definitions, and bad answers."""

from __future__ import annotations

import collections
import json
import re
import string

import numpy as np
import pytest
from conftest import transformers

from bert_jax.data.answer_spans import squad_predictions
from bert_jax.data.squad import Answer, QAExample, example_from_record, prepare_features, read_squad
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.training.metrics import squad_metrics

WORDS = ("the a in at and of is who where what lives works visited met anna berg oslo bergen "
         "nordic bank paris france city capital river old new big does").split()
LONG = ("Anna Berglund lives in Oslo and works at Nordic Bank. The old bank in Bergen visited "
        "Annas Berg, Paris is the capital city of France and the river in the city is old. "
        "Anna met Berg in Paris! The new bank of Oslo is big, and the city of Bergen is old.")
SHORT = "Berg lives in Bergen."


def qa(qid, question, context, *answers, impossible=False):
    return {"id": qid, "question": question, "is_impossible": impossible,
            "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}


SQUAD_V2 = {"version": "v2.0", "data": [
    {"title": "Anna", "paragraphs": [{"context": LONG, "qas": [
        qa("q1", "Where does Anna live?", LONG, "Oslo"),
        qa("q2", "  What is the capital of France?", LONG, "Paris is the capital"),
        qa("q3", "Who met Berg?", LONG, "Anna met Berg in Paris"),
        qa("q4", "What is old?", LONG, "Bergen is old."),  # ends the context
        qa("q5", "Who does the river visit?", LONG, impossible=True)]}]},
    {"title": "Berg", "paragraphs": [{"context": SHORT, "qas": [
        qa("q6", "Who lives in Bergen?", SHORT, "Berg", "Berg lives"),
        qa("q7", "Where is Paris?", SHORT, impossible=True)]}]}]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS,
             "##s", "##lund", "##en"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad") / "dev-v2.0.json"
    path.write_text(json.dumps(SQUAD_V2))
    return read_squad(path)


def test_read_squad_v2_and_v1(examples, tmp_path):
    assert [e.id for e in examples] == [f"q{i}" for i in range(1, 8)]
    assert examples[0] == QAExample("q1", "Where does Anna live?", LONG,
                                    (Answer("Oslo", LONG.index("Oslo")),))
    assert examples[4].answers == () and examples[6].answers == ()  # is_impossible
    assert len(examples[5].answers) == 2
    v1 = {"version": "1.1", "data": [{"title": "Berg", "paragraphs": [{"context": SHORT, "qas": [
        {k: v for k, v in qa("q6", "Who lives in Bergen?", SHORT, "Berg").items()
         if k != "is_impossible"}]}]}]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert read_squad(tmp_path / "v1.json") == [examples[5].__class__(
        "q6", "Who lives in Bergen?", SHORT, (Answer("Berg", 0),))]
    record = {"id": "q6", "question": "Who lives in Bergen?", "context": SHORT,
              "answers": {"text": ["Berg", "Berg lives"], "answer_start": [0, 0]}}
    assert example_from_record(record) == examples[5]


def run_qa_features(tokenizer, examples, max_length, doc_stride):
    """transformers' examples/pytorch/question-answering/run_qa.py: prepare_train_features'
    start/end positions and prepare_validation_features' offset_mapping, with the HF tokenizer.
    (run_qa's start scan can run past the context when an answer starts at a window's last
    token; here it stops at the context's end, as the Hugging Face course's version does.)"""
    tokenized = tokenizer([e.question.lstrip() for e in examples], [e.context for e in examples],
                          truncation="only_second", max_length=max_length, stride=doc_stride,
                          return_overflowing_tokens=True, return_offsets_mapping=True)
    features = []
    for i, offsets in enumerate(tokenized["offset_mapping"]):
        ids = tokenized["input_ids"][i]
        sequence_ids = tokenized.sequence_ids(i)
        example = examples[tokenized["overflow_to_sample_mapping"][i]]
        cls_index = ids.index(tokenizer.cls_token_id)
        start = end = cls_index
        if example.answers:
            start_char = example.answers[0].start
            end_char = start_char + len(example.answers[0].text)
            token_start = sequence_ids.index(1)
            token_end = len(ids) - 1
            while sequence_ids[token_end] != 1:
                token_end -= 1
            if offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char:
                while token_start <= token_end and offsets[token_start][0] <= start_char:
                    token_start += 1
                start = token_start - 1
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                end = token_end + 1
        features.append({
            "example_index": tokenized["overflow_to_sample_mapping"][i], "input_ids": ids,
            "token_type_ids": tokenized["token_type_ids"][i], "cls_index": cls_index,
            "start_position": start, "end_position": end,
            "offset_mapping": [o if sequence_ids[k] == 1 else None for k, o in enumerate(offsets)]})
    return features


def test_features_equal_run_qa_preprocessing(tokenizer_dir, examples):
    """Windows of 32 tokens overlapping by 8: the long context spans several, so answers fall
    inside some windows and outside others (CLS targets)."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = run_qa_features(hf_tokenizer, examples, 32, 8)
    features = prepare_features(examples, load_tokenizer(tokenizer_dir), max_length=32,
                                doc_stride=8)
    assert len(features) == len(expected) > len(examples)
    for f, e in zip(features, expected):
        assert {"example_index": f.example_index, "input_ids": f.encoding.ids,
                "token_type_ids": f.encoding.type_ids, "cls_index": f.cls_index,
                "start_position": f.start_position, "end_position": f.end_position,
                "offset_mapping": f.context_offsets} == e
    # Every in-window target spells its answer out of the context.
    inside = [f for f in features if f.start_position != f.cls_index]
    assert len(inside) < len(features)
    for f in inside:
        example = examples[f.example_index]
        offsets = f.context_offsets
        span = example.context[offsets[f.start_position][0]:offsets[f.end_position][1]]
        assert span == example.answers[0].text
    assert any(examples[f.example_index].id == "q4" for f in inside)  # answer ending the context


def test_squad_predictions_decode_spans_across_windows(tokenizer_dir, examples):
    """Logits that point at a known span in one window of each example (and, for SQuAD 2.0,
    at CLS for the unanswerable ones): the decoded answers are those spans."""
    features = prepare_features(examples, load_tokenizer(tokenizer_dir), max_length=32,
                                doc_stride=8)
    starts, ends = [], []
    chosen = {}  # example index -> the feature that holds its answer
    for i, f in enumerate(features):
        start_T, end_T = np.zeros(40), np.zeros(40)  # rows padded past the window, as batches are
        if examples[f.example_index].answers and f.start_position != f.cls_index:
            if chosen.setdefault(f.example_index, i) == i:
                start_T[f.start_position] = end_T[f.end_position] = 10.0
        if not examples[f.example_index].answers:
            start_T[f.cls_index] = end_T[f.cls_index] = 10.0
        starts.append(start_T)
        ends.append(end_T)
    v2 = squad_predictions(examples, features, starts, ends, version_2_with_negative=True)
    assert v2 == {e.id: e.answers[0].text if e.answers else "" for e in examples}
    # SQuAD 1.1 decoding never answers "", and max_answer_length bounds the spans.
    v1 = squad_predictions(examples, features, starts, ends, max_answer_length=2)
    assert all(v1.values()) and len(v1["q3"].split()) <= 2


def test_bad_answer_names_the_question(tmp_path):
    bad = json.loads(json.dumps(SQUAD_V2))
    bad["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 5
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BertJaxError, match=r"bad.json: question 'q6': answer 'Berg' at character "
                                           r"5 is not in its context"):
        read_squad(tmp_path / "bad.json")
    with pytest.raises(BertJaxError, match="question 'x': answer 'Paris' at character 40"):
        QAExample("x", "Where?", SHORT, (Answer("Paris", 40),))
    (tmp_path / "not_squad.json").write_text(json.dumps({"data": [{"title": "no paragraphs"}]}))
    with pytest.raises(BertJaxError, match="not a SQuAD file"):
        read_squad(tmp_path / "not_squad.json")


# The official SQuAD evaluation scripts (evaluate-v1.1.py, evaluate-v2.0.py), as written there.
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_v1_f1(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_v1_evaluate(examples, predictions):
    exact = f1 = 0.0
    for e in examples:
        golds = [a.text for a in e.answers]
        exact += max(official_normalize_answer(predictions[e.id]) == official_normalize_answer(g)
                     for g in golds)
        f1 += max(official_v1_f1(predictions[e.id], g) for g in golds)
    return {"exact_match": 100.0 * exact / len(examples), "f1": 100.0 * f1 / len(examples)}


def official_v2_compute_f1(a_gold, a_pred):
    """The v2.0 script's compute_f1: the v1.1 script's F1, but 1 when both sides are empty."""
    gold_toks = official_normalize_answer(a_gold).split() if a_gold else []
    pred_toks = official_normalize_answer(a_pred).split() if a_pred else []
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    return official_v1_f1(a_pred, a_gold)


def official_v2_evaluate(examples, predictions):
    exact, f1 = {}, {}
    for e in examples:
        golds = [a.text for a in e.answers if official_normalize_answer(a.text)] or [""]
        pred = predictions[e.id]
        exact[e.id] = max(int(official_normalize_answer(g) == official_normalize_answer(pred))
                          for g in golds)
        f1[e.id] = max(official_v2_compute_f1(g, pred) for g in golds)

    def make_eval_dict(ids):
        return {"exact": 100.0 * sum(exact[i] for i in ids) / len(ids),
                "f1": 100.0 * sum(f1[i] for i in ids) / len(ids), "total": len(ids)}

    out = make_eval_dict([e.id for e in examples])
    for name, has in (("HasAns", True), ("NoAns", False)):
        for k, v in make_eval_dict([e.id for e in examples if bool(e.answers) == has]).items():
            out[f"{name}_{k}"] = v
    return out


PREDICTIONS = {  # normalisation, partial overlap, repeated words, several gold answers, empties
    "q1": "oslo!", "q2": "The capital of Paris is", "q3": "Anna met  Berg in Paris in Paris",
    "q4": "an old Bergen", "q5": "", "q6": "Berg lives in", "q7": "Paris"}


def test_em_f1_match_official_scripts(examples):
    ours = squad_metrics(examples, PREDICTIONS)
    official = official_v2_evaluate(examples, PREDICTIONS)
    assert ours.pop("total") == official.pop("total")
    renamed = {k.replace("exact", "exact_match"): v for k, v in official.items()}
    assert ours.keys() == renamed.keys()
    np.testing.assert_allclose([ours[k] for k in renamed], list(renamed.values()), rtol=1e-12)
    answerable = [e for e in examples if e.answers]
    v1 = squad_metrics(answerable, PREDICTIONS)
    assert set(v1) == {"exact_match", "f1", "total"}  # no HasAns / NoAns split for SQuAD 1.1
    expected = official_v1_evaluate(answerable, PREDICTIONS)
    np.testing.assert_allclose([v1["exact_match"], v1["f1"]],
                               [expected["exact_match"], expected["f1"]], rtol=1e-12)
    assert 0 < v1["exact_match"] < v1["f1"] < 100  # the cases are not all hits or all misses
    with pytest.raises(BertJaxError, match="no prediction for 1 question.*'q7'"):
        squad_metrics(examples, {k: v for k, v in PREDICTIONS.items() if k != "q7"})
