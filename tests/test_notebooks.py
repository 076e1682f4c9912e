"""The Colab notebooks (notebooks/*.ipynb): each runs top to bottom in a fresh Jupyter kernel,
as a user would run it, on the CPU with tiny models and no download (BERT_JAX_NOTEBOOK_CI=1),
and its last cell asserts the result against a reference (transformers, a recomputation, the
CLI). The committed files carry no outputs."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURES = ROOT / "tests" / "fixtures"
COLAB = "https://colab.research.google.com/github/YOUR_ORG/bert_jax/blob/main/notebooks/"


def test_readme_links_every_notebook():
    """One row per notebook in notebooks/README.md, its Colab badge included."""
    readme = (ROOT / "notebooks" / "README.md").read_text()
    linked = set(re.findall(r"\]\(([a-z0-9_]+\.ipynb)\)", readme))
    assert linked == {p.name for p in NOTEBOOKS} and len(NOTEBOOKS) == 5
    assert all(COLAB + p.name in readme for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    """Outputs, execution counts and run timings stay out of git; every notebook is valid
    nbformat v4 and opens with its Colab badge."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        assert "execution" not in cell.metadata, f"{path.name}: run metadata committed"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: outputs committed in cell {cell.id} (see docs/notebooks.md)")
    assert COLAB + path.name in notebook.cells[0].source


def test_notebooks_share_the_setup_cells():
    """The install and runtime-detection cells are the same everywhere: fix one, fix all."""
    setups = {path.name: [c.source for c in nbformat.read(path, as_version=4).cells
                          if c.cell_type == "code"][:2] for path in NOTEBOOKS}
    first = next(iter(setups.values()))
    assert "%pip install" in first[0] and "jax.devices()" in first[1]
    assert all(setup == first for setup in setups.values()), setups


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    """A fresh kernel in an empty directory; any failing cell (its last one asserts the
    notebook's result) fails the test with the cell's traceback."""
    notebook = nbformat.read(path, as_version=4)
    assert "assert " in notebook.cells[-1].source, f"{path.name}: the last cell checks nothing"
    monkeypatch.setenv("BERT_JAX_NOTEBOOK_CI", "1")
    monkeypatch.setenv("BERT_JAX_FIXTURES", str(FIXTURES))
    # The kernel ("python") and the shell cells ("bert-jax") come from this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
