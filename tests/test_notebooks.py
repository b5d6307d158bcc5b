"""The tutorial notebooks run offline from top to bottom (nbclient, a kernel of this venv), each with a
plot, a table of atoms in context and a closing "what you just saw"; stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(
    (Path(__file__).resolve().parents[1] / "itda_lens" / "notebooks").glob("*.ipynb")
)


def test_the_five_tutorials_exist() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "comparing_models",
        "model_diffing",
        "quickstart",
        "splinterp",
        "transcoders",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is stored with outputs; clear them before committing"
    )
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    data = [o.get("data", {}) for c in code for o in c.outputs]
    assert any("image/png" in d for d in data), f"{path.name} shows no plot"
    tables = [d["text/html"] for d in data if "<table" in d.get("text/html", "")]
    assert any("[[" in t for t in tables), f"{path.name} shows no table of atoms in context"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## What you just saw")
