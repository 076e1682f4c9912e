"""What the tests build for themselves (nothing is downloaded): tiny random Hugging Face
models, and a small real corpus (the standard library's docstrings) prepared for pretraining."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set before JAX starts, and inherited by every process a test starts: the CPU backend, and
# unoptimised XLA (the tests' tiny programs compile in about 60% of the time; how fast they
# then run matters less, except in the few long runs: `optimised_env`).
UNOPTIMISED = "--xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), UNOPTIMISED]).strip()


def pytest_collection_modifyitems(items):
    """Slow-marked tests first, so that two workers finish together instead of one waiting
    for the other's last long test (pytest.ini's `--dist loadgroup` keeps each module that
    shares an expensive module fixture on one worker)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def simulated_devices_env(devices: int) -> dict[str, str]:
    """The environment of a process that sees `devices` simulated CPU devices."""
    flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags}


def optimised_env() -> dict[str, str]:
    """The environment of a process whose XLA optimises as usual: for a run of many steps,
    which unoptimised code makes ~3x slower."""
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(UNOPTIMISED, "").strip()}
    if not env["XLA_FLAGS"]:  # XLA reads a blank value as a file name
        del env["XLA_FLAGS"]
    return env


def pytest_configure(config):
    """One cache directory for the whole run, made by the main process before any worker
    starts (workers and the CLI processes tests start inherit it): runs of the same tiny
    recipe share their compiled steps, and nothing is written to the user's ~/.cache."""
    if "BERT_JAX_TEST_CACHE" not in os.environ:
        os.environ["BERT_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="bert_jax_test_cache_")
        config.add_cleanup(lambda: shutil.rmtree(os.environ.pop("BERT_JAX_TEST_CACHE"),
                                                 ignore_errors=True))
    os.environ["XDG_CACHE_HOME"] = os.environ["BERT_JAX_TEST_CACHE"]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = {"bert": ("Bert", "BertConfig"), "megatron-bert": ("MegatronBert", "MegatronBertConfig")}
HEADS = ("Model", "ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction",
         "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")
VOCAB = 99
# NorBERT 4 reference outputs with tiny random weights (see its README).
NORBERT4_TINY = Path(__file__).resolve().parent / "fixtures" / "norbert4-tiny"


def make_hf_model(model_type: str = "bert", head: str = "ForMaskedLM", seed: int = 0, **overrides):
    """A tiny `transformers` model with every parameter randomised (LN and biases included),
    so a mis-mapped tensor cannot hide behind an init of ones or zeros."""
    prefix, config_name = FAMILIES[model_type]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                  num_labels=2 if head == "ForQuestionAnswering" else 3,
                  attn_implementation="eager")
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + head)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_model(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def example_batch(head: str = "ForMaskedLM", batch: int = 3, length: int = 11, seed: int = 0):
    """input_ids / attention_mask (right padding) / token_type_ids as int64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):
        mask[row, length - 3 * row:] = 0
    ids = np.where(mask == 1, ids, 0)
    types = np.zeros((batch, length), np.int64)
    types[:, length // 2:] = 1
    types *= mask
    if head == "ForMultipleChoice":  # [B, C, T] with 2 choices
        ids = np.stack([ids, np.roll(ids, 1, axis=0)], axis=1)
        mask = np.stack([mask, np.roll(mask, 1, axis=0)], axis=1)
        types = np.stack([types, np.roll(types, 1, axis=0)], axis=1)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run_hf(model, batch, **labels):
    with torch.no_grad():
        inputs = {k: torch.as_tensor(v) for k, v in {**batch, **labels}.items()}
        return model(**inputs, output_hidden_states=True)


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: hf_dir(model_type, head, **config) -> (torch model, saved directory)."""

    def make(model_type="bert", head="ForMaskedLM", name="hf", **overrides):
        model = make_hf_model(model_type, head, **overrides)
        return model, save_hf_model(model, tmp_path / name)

    return make


def docstrings(limit: int) -> list[str]:
    """Multi-line docstrings of the standard library, one document each."""
    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                lines = [line.strip() for line in (doc or "").splitlines() if line.strip()]
                if len(lines) >= 2:
                    found.append("\n".join(lines))
        if len(found) >= limit:
            return found[:limit]
    return found


def prepare_docstrings(root: Path, documents: int, train: int, vocab_size: int) -> Path:
    """The first `documents` docstrings, `train` of them for training and the rest held out,
    a WordPiece tokenizer (`root/tok`) and prepared shards (`root/train`, `root/eval`)."""
    from bert_jax.cli import main

    docs = docstrings(documents)
    (root / "train.txt").write_text("\n\n".join(docs[:train]) + "\n")
    (root / "eval.txt").write_text("\n\n".join(docs[train:]) + "\n")
    assert main(["train-tokenizer", str(root / "train.txt"), "--out", str(root / "tok"),
                 "--vocab-size", str(vocab_size)]) == 0
    for split in ("train", "eval"):
        assert main(["prepare-data", str(root / f"{split}.txt"), "--out", str(root / split),
                     "--tokenizer", str(root / "tok"), "--workers", "1", "--quiet"]) == 0
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Docstrings split into train/eval text, a WordPiece tokenizer and prepared shards."""
    return prepare_docstrings(tmp_path_factory.mktemp("corpus"), 400, 340, 1000)


def start_cli(args: list[str], devices: int) -> subprocess.Popen:
    """`bert-jax ARGS` in a new process with `devices` simulated CPU devices (stderr kept)."""
    return subprocess.Popen([sys.executable, "-m", "bert_jax.cli", *args],
                            env=simulated_devices_env(devices),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def start_two_processes(args: list[str], devices: int) -> list[subprocess.Popen]:
    """`bert-jax ARGS` as processes 0 and 1 of one run (jax.distributed on a free port)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [start_cli([*args, "--coordinator-address", f"localhost:{port}", "--num-processes",
                       "2", "--process-id", str(i)], devices) for i in range(2)]


def finish(processes: list[subprocess.Popen], timeout: int = 900) -> None:
    """Wait for every process; each must exit 0 (else its stderr's end is the message)."""
    for p in processes:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
