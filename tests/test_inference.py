"""Inference pipelines against `transformers.pipeline(...)` on tiny random models saved by
transformers, with a WordPiece tokenizer whose words form entities (sub-words, unknown words
and punctuation included): ner (every aggregation), text-classification, fill-mask,
question-answering (long contexts in several windows) and embeddings; `bert-jax predict`."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import NORBERT4_TINY, make_hf_model, save_hf_model, torch, transformers

import bert_jax
from bert_jax.cli import main
from bert_jax.data.tokenizer import load_tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.inference.embeddings import embed
from bert_jax.inference.fill_mask import fill_mask
from bert_jax.inference.ner import AGGREGATIONS, ner
from bert_jax.inference.question_answering import answer
from bert_jax.inference.text_classification import classify

WORDS = ("the a in at and of is lives works visited met anna berg oslo bergen nordic bank "
         "paris france city capital river old new big").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS,
         "##s", "##lund", "##en", "##o"]
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
# "Berglund" and "Annas" split into sub-words, "Zyx" is unknown.
TEXTS = ["Anna Berglund lives in Oslo and works at Nordic Bank.",
         "The bank in Bergen visited Annas Berg, Paris!", "Zyx met Anna in Oslo", "paris"]
CONTEXT = ("Anna Berglund lives in Oslo and works at Nordic Bank. The old bank in Bergen visited "
           "Annas Berg, Paris is the capital city of France and the river in the city is old. "
           "Anna met Berg in Paris! The new bank of Oslo is big, and the city of Bergen is old.")
QUESTIONS = ["Where does Anna live?", "What is the capital of France?", "Who met Berg?"]


def saved(tmp_path_factory, name, head, scale_head=None, **config):
    """A tiny random model with the test tokenizer, both saved by transformers; `scale_head`
    sharpens the head's outputs so that predictions differ from token to token."""
    path = tmp_path_factory.mktemp(name)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    (path / "vocab.txt").unlink()
    model = make_hf_model("bert", head, vocab_size=len(VOCAB), **config)
    if scale_head:
        with torch.no_grad():
            getattr(model, scale_head).weight.mul_(20)
    return save_hf_model(model, path)


def hf_pipeline(task, path):
    return transformers.pipeline(task, model=path, device="cpu")


def ours(path, **kwargs):
    """Our model and tokenizer; tests share them through module fixtures, since each model
    object compiles its own forward."""
    return bert_jax.from_pretrained(path, **kwargs), load_tokenizer(path)


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    return saved(tmp_path_factory, "ner", "ForTokenClassification", "classifier",
                 num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                 label2id={label: i for i, label in enumerate(LABELS)})


@pytest.fixture(scope="module")
def ner_model(ner_dir):
    return ours(ner_dir)


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    return saved(tmp_path_factory, "qa", "ForQuestionAnswering", "qa_outputs")


@pytest.fixture(scope="module")
def qa_model(qa_dir):
    return ours(qa_dir)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return saved(tmp_path_factory, "mlm", "ForMaskedLM")


def assert_same_results(ours: list[dict], expected: list[dict]):
    """Same keys and values, scores to 1e-4."""
    assert [sorted(r) for r in ours] == [sorted(r) for r in expected]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "score"} for r in rs]  # noqa: E731
    assert strip(ours) == strip(expected)
    np.testing.assert_allclose([r["score"] for r in ours], [float(r["score"]) for r in expected],
                               atol=1e-4)


def test_ner_matches_pipeline_for_every_aggregation(ner_dir, ner_model):
    pipe = hf_pipeline("ner", ner_dir)
    for aggregation in AGGREGATIONS:
        expected = pipe(TEXTS, aggregation_strategy=aggregation)
        # batch_size 2: two batches, results put back in input order.
        results = ner(*ner_model, TEXTS, aggregation, batch_size=2)
        assert sum(map(len, expected)) > len(TEXTS)  # entities found, not all "O"
        for our_entities, expected_entities in zip(results, expected, strict=True):
            assert_same_results(our_entities, expected_entities)


@pytest.mark.parametrize("problem_type, num_labels", [
    (None, 3), ("multi_label_classification", 3), ("regression", 1), (None, 1)])
def test_text_classification_matches_pipeline(tmp_path_factory, problem_type, num_labels):
    """softmax / sigmoid / none as transformers picks them; top_k; text pairs."""
    labels = ["negative", "neutral", "positive"][:num_labels]
    path = saved(tmp_path_factory, "cls", "ForSequenceClassification", "classifier",
                 num_labels=num_labels, problem_type=problem_type, id2label=dict(enumerate(labels)),
                 label2id={label: i for i, label in enumerate(labels)})
    pipe = hf_pipeline("text-classification", path)
    model, tokenizer = ours(path)
    # Pairs as short as the texts: one length bucket, one compilation.
    pairs = [{"text": t, "text_pair": p}
             for t, p in zip(TEXTS, ["Oslo", "Paris", "Anna", "Bergen"])]
    for inputs, top_k in ((TEXTS, None), (TEXTS, 2), (pairs, 1)):
        expected = pipe(inputs, top_k=top_k)
        results = classify(model, tokenizer, inputs, top_k=top_k)
        for our_labels, expected_labels in zip(results, expected, strict=True):
            assert_same_results(our_labels, expected_labels)


def test_fill_mask_batch_matches_pipeline(mlm_dir, monkeypatch):
    """Several texts of different lengths in length buckets, one or two masks each; the
    vocabulary logits are computed at the masks only (`[B, P, V]`, P a power of two)."""
    texts = ["Anna [MASK] in Oslo.", "The [MASK] bank of Bergen is [MASK] and old!",
             "[MASK] is the capital city of France and the river is old."]
    expected = hf_pipeline("fill-mask", mlm_dir)(texts, top_k=3)
    model, tokenizer = ours(mlm_dir)
    logits_shapes = []
    forward = type(model).__call__

    def recording_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        logits_shapes.append(out.logits.shape)
        return out

    monkeypatch.setattr(type(model), "__call__", recording_forward)
    results = fill_mask(model, tokenizer, texts, top_k=3, batch_size=2)
    vocab = model.config.vocab_size
    assert sorted(logits_shapes) == [(1, 1, vocab), (2, 2, vocab)]
    for our_text, expected_text in zip(results, expected, strict=True):
        if isinstance(expected_text[0], dict):
            our_text, expected_text = [our_text], [expected_text]
        for our_mask, expected_mask in zip(our_text, expected_text, strict=True):
            assert_same_results(our_mask, expected_mask)


def hf_question_answering(path, question, context, *, top_k=1, max_seq_len, doc_stride,
                          max_answer_len=15, handle_impossible_answer=False, align_to_words=True):
    """transformers' QuestionAnsweringPipeline (4.x; dropped in 5.x) for a fast tokenizer
    padding on the right: windows from the HF tokenizer, logits from the torch model, spans from
    transformers' own `select_starts_ends`, then the pipeline's word alignment and merging."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    tokenizer, model = hf_qa_model(path)
    windows = tokenizer(text=question, text_pair=context, truncation="only_second",
                        max_length=max_seq_len, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True, return_token_type_ids=True)
    answers, min_null_score = [], 1000000
    for i, ids in enumerate(windows["input_ids"]):
        p_mask = np.array([[seq != 1 for seq in windows.sequence_ids(i)]], np.int64)
        p_mask[0, np.array(ids) == tokenizer.cls_token_id] = 0
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]),
                        token_type_ids=torch.tensor([windows["token_type_ids"][i]]))
        attention = np.array([windows["attention_mask"][i]])
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits.numpy(), out.end_logits.numpy(), p_mask, attention, min_null_score,
            top_k * 2 + 10 if align_to_words else top_k, handle_impossible_answer, max_answer_len)
        for s, e, score in zip(starts, ends, scores):
            start, end = hf_char_span(windows[i], s, e, align_to_words)
            same = [a for a in answers if a["answer"].lower() == context[start:end].lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start, "end": end,
                                "answer": context[start:end]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]


@functools.cache
def hf_qa_model(path):
    return (transformers.AutoTokenizer.from_pretrained(path),
            transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval())


def hf_char_span(encoding, s, e, align_to_words):
    """QuestionAnsweringPipeline.get_indices: whole words when possible, else token offsets."""
    if align_to_words:
        try:
            return (encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0],
                    encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1])
        except Exception:
            pass
    return encoding.offsets[s][0], encoding.offsets[e][1]


@pytest.mark.parametrize("options", [
    {}, {"top_k": 3}, {"top_k": 2, "handle_impossible_answer": True},
    {"top_k": 2, "align_to_words": False}, {"top_k": 4, "max_answer_len": 3}])
def test_question_answering_matches_pipeline(qa_dir, qa_model, options):
    """A context of several windows (max_seq_len 32, doc_stride 8): same answers, character
    spans and scores. (Also checked once against transformers 4.57.6's own pipeline.)"""
    windows = dict(max_seq_len=32, doc_stride=8)
    results = answer(*qa_model, QUESTIONS, CONTEXT, batch_size=4, **windows, **options)
    for question, our_answers in zip(QUESTIONS, results, strict=True):
        expected = hf_question_answering(qa_dir, question, CONTEXT, **windows, **options)
        assert_same_results(our_answers if isinstance(our_answers, list) else [our_answers],
                            expected)


def test_embeddings_pool_transformers_hidden_states(mlm_dir):
    """Mean / CLS pooling of the feature-extraction pipeline's hidden states; a base model and
    an MLM model (pooling its last hidden layer) give the same matrix."""
    hidden = [np.asarray(h[0]) for h in hf_pipeline("feature-extraction", mlm_dir)(TEXTS)]
    base, tokenizer = ours(mlm_dir, head="Model")
    mlm = bert_jax.from_pretrained(mlm_dir)
    for pooling in ("mean", "cls"):
        expected = np.stack([h.mean(0) if pooling == "mean" else h[0] for h in hidden])
        raw = embed(base, tokenizer, TEXTS, pooling, normalize=False, batch_size=2)
        np.testing.assert_allclose(raw, expected, atol=1e-4)
        unit = embed(mlm, tokenizer, TEXTS, pooling)
        np.testing.assert_allclose(
            unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-4)


def test_gpt_bert_padded_buckets_equal_unpadded_forward(tmp_path):
    """GPT-BERT (NorBERT 4 fixture: no token types, windowed attention): NER scores from the
    padded, bucketed batches equal the softmax of each text's own unpadded forward."""
    fixture = NORBERT4_TINY
    shutil.copytree(fixture / "token_classification", tmp_path / "gpt")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "gpt")
    model, tokenizer = ours(tmp_path / "gpt")
    # The shortest text shares its bucket with the longest, so most of its row is padding.
    tokens = ner(model, tokenizer, [TEXTS[0], TEXTS[-1]], "none", ignore_labels=())[1]
    ids = tokenizer.encode(TEXTS[-1])
    probs = np.asarray(jax.nn.softmax(model(np.array([ids])).logits[0]))
    assert [t["index"] for t in tokens] == list(range(1, len(ids) - 1))
    np.testing.assert_allclose([t["score"] for t in tokens],
                               [probs[t["index"]].max() for t in tokens], atol=1e-5)


def test_cli_predict_json_equals_api(ner_dir, ner_model, capsys):
    assert main(["predict", "--task", "ner", "--model", ner_dir, "--aggregation", "simple",
                 "--json", *TEXTS[:2]]) == 0
    api = ner(*ner_model, TEXTS[:2], "simple")
    cli = json.loads(capsys.readouterr().out)
    for cli_entities, api_entities in zip(cli, api, strict=True):
        assert_same_results(cli_entities, api_entities)


def test_cli_predict_question_answering_from_file(qa_dir, qa_model, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n\n")
    assert main(["predict", "--task", "question-answering", "--model", qa_dir, "--file",
                 str(questions), "--context", CONTEXT]) == 0
    out = capsys.readouterr().out
    api = answer(*qa_model, QUESTIONS, CONTEXT)
    for a in api:
        assert f"{a['score']:.4f}  {a['start']}-{a['end']}  {a['answer']}" in out


def test_cli_predict_bad_input(qa_dir, capsys):
    """One-line errors: a head that does not fit the task, QA without a context."""
    assert main(["predict", "--task", "ner", "--model", qa_dir, "a text"]) == 1
    assert "ner needs a token-classification head" in capsys.readouterr().err
    assert main(["predict", "--task", "question-answering", "--model", qa_dir, "who?"]) == 1
    assert "--context is needed" in capsys.readouterr().err


def test_bad_options(ner_model, qa_model):
    with pytest.raises(BertJaxError, match="unknown aggregation 'mean'"):
        ner(*ner_model, TEXTS, "mean")
    with pytest.raises(BertJaxError, match="doc_stride"):
        answer(*qa_model, "who?", CONTEXT, max_seq_len=16, doc_stride=32)
    with pytest.raises(BertJaxError, match="token-classification head"):
        ner(*qa_model, TEXTS)


def test_text_classification_of_a_too_long_text_errs_or_truncates(tmp_path_factory):
    """Over the model's positions: one clear error by default; with truncation the scores
    equal the pipeline's `truncation=True`."""
    path = saved(tmp_path_factory, "cls-long", "ForSequenceClassification", "classifier",
                 num_labels=2)
    model, tokenizer = ours(path)
    long_text = " ".join(TEXTS * 40)
    with pytest.raises(BertJaxError, match="more than max_position_embeddings"):
        classify(model, tokenizer, long_text)
    positions = model.config.max_position_embeddings  # our tiny tokenizer declares no max
    expected = hf_pipeline("text-classification", path)(long_text, top_k=None, truncation=True,
                                                         max_length=positions)
    assert_same_results(classify(model, tokenizer, long_text, top_k=None, truncation=True),
                        expected)
