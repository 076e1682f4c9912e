"""The repository stands on its own, and the package's imports run downwards only."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bert_jax"
OUTSIDE = "../" + "shared"  # spelt apart, so that this file does not name it

# Lowest first. A module may import its own unit and any unit of a lower layer, nothing of
# its own layer or above: so `modeling` imports nothing that builds on it, `convert` and
# `pretrained` never import `training` or `inference`, and `data` never imports `modeling`.
LAYERS = [
    {"errors", "version"},
    {"files", "sharding", "distributed"},
    {"modeling", "data"},
    {"convert"},
    {"pretrained"},
    {"training", "inference", "tools"},
    {"demo"},
    {"cli"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    return [ROOT / name for name in listed.split("\0") if name]


def _unit(module_path: Path) -> str:
    """`bert_jax/training/loop.py` -> "training"; `bert_jax/cli.py` -> "cli"."""
    return module_path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """The units of bert_jax a module imports (`from bert_jax import sharding` -> sharding)."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        units |= {name.split(".")[1] for name in names
                  if name.startswith("bert_jax.") and name.count(".") >= 1}
    return units


def test_no_tracked_file_refers_outside_the_repository():
    """Fixtures and docs live in the repository: nothing points at a sibling `shared` folder."""
    offenders = [str(path.relative_to(ROOT)) for path in _tracked_files()
                 if path.is_file() and path.suffix not in {".safetensors", ".npz"}
                 and OUTSIDE in path.read_text(encoding="utf-8", errors="replace")]
    assert offenders == []


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or
             p.name != "__init__.py"}
    assert units <= set(LAYER_OF), f"add {units - set(LAYER_OF)} to LAYERS"


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py")
                                        if p != PACKAGE / "__init__.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards(path):
    unit = _unit(path)
    upward = {other for other in _imported_units(path) - {unit}
              if LAYER_OF[other] >= LAYER_OF[unit]}
    assert not upward, f"{path.relative_to(ROOT)} ({unit}) imports {sorted(upward)}, " \
                       "which is not below it (see LAYERS)"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above would fail on a modeling file that imports training."""
    module = tmp_path / "bad.py"
    module.write_text("from bert_jax.training import loop\nimport bert_jax.convert.hf_dir\n")
    assert _imported_units(module) == {"training", "convert"}
