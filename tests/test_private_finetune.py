"""DP-SGD fine-tuning: `bert-jax finetune` with a `dp` section trains on the privacy plan's
samples, logs epsilon as the accountant computes it, evaluates and exports. (That the private
step's gradients are right is tests/test_privacy.py's job; 24 noisy steps are too few to
assert learning here.)"""

from __future__ import annotations

import pytest
from conftest import transformers
from test_finetune import finetune, logged, tiny_model, write_classification

from bert_jax.training.privacy import epsilon


@pytest.mark.slow
def test_private_sequence_classification(tmp_path):
    model_dir = tiny_model(tmp_path / "model", "ForSequenceClassification", num_labels=2)
    train = write_classification(tmp_path / "train.csv", 64, seed=0)
    dev = write_classification(tmp_path / "dev.csv", 32, seed=1)
    run = tmp_path / "run"
    assert finetune("finetune-tiny-classification.yaml", f"model.init_from={model_dir}",
                    f"data.train={train}", f"data.eval={dev}", f"train.output_dir={run}",
                    "train.epochs=6", "train.log_every=4", "dp.clip_norm=1.0", "dp.delta=1e-3",
                    "dp.noise_multiplier=0.1") == 0
    records = logged(run)
    private = [r for r in records if "epsilon" in r]
    assert private and all(r["noise_multiplier"] == 0.1 for r in private)
    for r in private:  # q = batch 16 / 64 examples
        assert r["epsilon"] == pytest.approx(epsilon(0.1, 16 / 64, r["step"], 1e-3), rel=1e-9)
    assert all(0 < r["examples"] <= 64 for r in private)  # Poisson draws from 64 examples
    assert [r for r in records if "eval_accuracy" in r]
    model = transformers.BertForSequenceClassification.from_pretrained(run / "hf")
    assert model.config.id2label == {0: "neg", 1: "pos"}
