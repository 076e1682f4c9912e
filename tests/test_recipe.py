"""Pretraining recipes: YAML sections, --set overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

import bert_jax
from bert_jax.modeling.presets import preset
from bert_jax.training.objectives import pretraining_head
from bert_jax.training.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["bert-base-cased-phase1.yaml", "bert-base-cased-phase2.yaml",
                                  "bert-large-swedish-cased.yaml", "norbert4-base.yaml",
                                  "ts1-continued.yaml", "tiny-mlm.yaml"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(CONFIGS / name)
    schedule = recipe.optimizer.optimizer_config(recipe.train.steps)
    assert schedule.total_steps == recipe.train.steps
    if recipe.model.preset is not None:  # the model and its objective can be built
        config = preset(recipe.model.preset, **recipe.model.overrides)
        assert pretraining_head(config, recipe.data.nsp) in config.HEADS
        assert recipe.data.max_seq_length <= config.max_length[1]  # (field name, limit)


def test_phase1_is_the_published_recipe():
    recipe = load_recipe(CONFIGS / "bert-base-cased-phase1.yaml")
    assert (recipe.data.max_seq_length, recipe.data.global_batch_size) == (128, 256)
    assert (recipe.optimizer.learning_rate, recipe.optimizer.warmup_steps) == (1e-4, 10000)
    assert (recipe.optimizer.b1, recipe.optimizer.b2, recipe.optimizer.weight_decay) == (
        0.9, 0.999, 0.01)


def test_overrides():
    recipe = load_recipe(CONFIGS / "tiny-mlm.yaml",
                         ["optimizer.learning_rate=5e-4", "mesh.data=2", "train.output_dir=x"])
    assert recipe.optimizer.learning_rate == 5e-4
    assert recipe.optimizer.warmup_steps == 20  # the rest of the section is kept
    assert recipe.mesh.data == 2 and recipe.train.output_dir == "x"


@pytest.mark.parametrize("overrides,needle", [
    (["train.stepz=3"], "recipe.train: unknown key 'stepz'"),
    (["nonsense.key=1"], "recipe: unknown key 'nonsense'"),
    (["optimizer.learning_rate=-1"], "learning_rate"),
    (["trainsteps=3"], "expected section.key=value"),
])
def test_bad_keys_are_named(overrides, needle):
    with pytest.raises(bert_jax.BertJaxError, match=needle):
        load_recipe(CONFIGS / "tiny-mlm.yaml", overrides)


def test_bad_yaml(tmp_path):
    (tmp_path / "r.yaml").write_text("model: [unclosed")
    with pytest.raises(bert_jax.BertJaxError, match="r.yaml: cannot read the recipe"):
        load_recipe(tmp_path / "r.yaml")
