"""GPT-BERT generation: the KV cache reproduces full recomputation, sampling options, stop
tokens, and the CLI (generate and fill-mask) on a GPT-BERT directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import NORBERT4_TINY
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import bert_jax
from bert_jax.inference.generate import Sampling, generate
from bert_jax.modeling.gpt_bert import init_cache

PROMPTS = [[1, 50, 60, 70, 80], [1] + list(range(10, 21))]  # different lengths: left padding
NEW_TOKENS = 30  # 42 tokens in all: past the local (8) and the global (24) window



@pytest.fixture(scope="module")
def causal():
    return bert_jax.from_pretrained(NORBERT4_TINY / "causal_lm")


def recompute_greedy(model, prompt, steps):
    """The slow oracle: a full causal forward over the whole sequence for every new token
    (right-padded to its final length, which a causal model's earlier positions never see:
    one compiled shape)."""
    sequence, new = list(prompt), []
    length = len(prompt) + steps
    for _ in range(steps):
        ids = np.zeros((1, length), int)
        ids[0, :len(sequence)] = sequence
        mask = (np.arange(length) < len(sequence)).astype(int)[None]
        logits = np.asarray(model(ids, attention_mask=mask).logits)
        new.append(int(np.argmax(logits[0, len(sequence) - 1])))
        sequence.append(new[-1])
    return new


def test_kv_cache_equals_recomputation(causal):
    out = generate(causal, PROMPTS, NEW_TOKENS, stop_token_ids=())
    for prompt, tokens in zip(PROMPTS, out):
        assert tokens == recompute_greedy(causal, prompt, NEW_TOKENS)


def test_masked_lm_checkpoint_generates_the_same(causal):
    """NorBERT 4 ships a masked-LM checkpoint; its weights drive the causal mode unchanged."""
    masked = bert_jax.from_pretrained(NORBERT4_TINY / "masked_lm")
    assert generate(masked, PROMPTS, 6, stop_token_ids=()) == generate(causal, PROMPTS, 6,
                                                                       stop_token_ids=())


def test_cache_is_bounded_by_the_windows(causal):
    config = causal.config
    cache = init_cache(config, batch=2, max_length=10_000)
    slots = [layer["k"].shape[1] for layer in cache["layers"]]
    assert slots == [config.window(i) for i in range(config.num_layers)] == [7, 7, 7, 23]


def test_sampling_options(causal):
    greedy = generate(causal, PROMPTS, 8, stop_token_ids=())
    assert generate(causal, PROMPTS, 8, sampling=Sampling(do_sample=True, top_k=1),
                    stop_token_ids=()) == greedy
    assert generate(causal, PROMPTS, 8, sampling=Sampling(do_sample=True, top_p=1e-6),
                    stop_token_ids=()) == greedy
    hot = Sampling(do_sample=True, temperature=5.0)
    first = generate(causal, PROMPTS, 8, sampling=hot, seed=1, stop_token_ids=())
    assert generate(causal, PROMPTS, 8, sampling=hot, seed=1, stop_token_ids=()) == first
    assert generate(causal, PROMPTS, 8, sampling=hot, seed=2, stop_token_ids=()) != first
    assert first != greedy
    top3 = generate(causal, PROMPTS, 1, sampling=Sampling(do_sample=True, top_k=3,
                                                          temperature=100.0), seed=3)
    for prompt, [token] in zip(PROMPTS, top3):
        logits = np.asarray(causal(np.array([prompt])).logits)[0, -1]
        assert token in np.argsort(-logits)[:3]


def test_stop_tokens(causal):
    greedy = generate(causal, PROMPTS, 8, stop_token_ids=())
    stop = greedy[0][2]
    out = generate(causal, PROMPTS, 8, stop_token_ids=(stop,))
    assert out[0] == greedy[0][: greedy[0].index(stop) + 1]
    assert out[1] == greedy[1][: greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1]


@pytest.mark.parametrize("call,needle", [
    (lambda m: generate(m, [[1] * 250], 10), "max_sequence_length=256"),
    (lambda m: generate(m, [[]], 10), "at least one token"),
    (lambda m: generate(m, [[1, 999]], 10), "vocab_size"),
    (lambda m: generate(m, [[1]], 5, sampling=Sampling(do_sample=True, temperature=0)),
     "temperature"),
])
def test_bad_generation_requests(causal, call, needle):
    with pytest.raises(bert_jax.BertJaxError, match=needle):
        call(causal)


def test_generation_needs_gpt_bert():
    model = bert_jax.from_pretrained(NORBERT4_TINY / "sequence_classification")
    with pytest.raises(bert_jax.BertJaxError, match="GptBertForSequenceClassification"):
        generate(model, [[1, 2]], 3)


CORPUS = ["Oslo er hovedstaden i Norge.", "Bergen ligger på vestlandet.",
          "Det regner ofte i Bergen.", "Hun leser en bok på biblioteket."] * 3


@pytest.fixture(scope="module")
def gpt_bert_dir(tmp_path_factory):
    """The fixture's masked LM with a small BPE tokenizer laid out as NorBERT 4's:
    <unk> <s> </s> <pad> <mask> = 0..4, and <s> prepended to every text."""
    path = tmp_path_factory.mktemp("norbert") / "model"
    shutil.copytree(NORBERT4_TINY / "masked_lm", path)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<mask>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"mask_token": "<mask>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bert_jax.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_equals_api(gpt_bert_dir):
    result = run_cli("generate", "--model", str(gpt_bert_dir), "Oslo er", "--max-new-tokens",
                     "6", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    model = bert_jax.from_pretrained(gpt_bert_dir)
    assert printed["prompt_ids"][0] == 1  # <s> first, as NorBERT 4's tokenizer does
    assert printed["generated_ids"] == generate(model, [printed["prompt_ids"]], 6)[0]


def test_cli_fill_mask_on_gpt_bert(gpt_bert_dir):
    """The masked LM's shifted logits let fill-mask read the prediction at the mask itself."""
    result = run_cli("fill-mask", "--model", str(gpt_bert_dir), "Oslo er <mask> i Norge.",
                     "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    model = bert_jax.from_pretrained(gpt_bert_dir)
    ids = Tokenizer.from_file(str(gpt_bert_dir / "tokenizer.json")).encode(
        "Oslo er <mask> i Norge.").ids
    logits = np.asarray(model(np.array([ids])).logits)[0, ids.index(4)]
    assert [p["token"] for p in predictions] == np.argsort(-logits)[:3].tolist()


def test_cli_generate_refuses_bert(tmp_path):
    from conftest import make_hf_model, save_hf_model

    path = save_hf_model(make_hf_model("bert", "ForMaskedLM"), tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[MASK]", "a"]))
    result = run_cli("generate", "--model", path, "a")
    assert result.returncode == 1 and "GPT-BERT" in result.stderr
