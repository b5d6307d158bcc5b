"""`benchmarks/render.py`: the README's tables are what the committed results render to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.benchmarks.helpers import BENCH


def _render_module():
    sys.path.insert(0, str(BENCH))
    try:
        import render
    finally:
        sys.path.remove(str(BENCH))
    return render


def test_readme_tables_are_rendered_from_committed_results() -> None:
    render = _render_module()
    text = (BENCH / "README.md").read_text()
    assert render.MARKER.search(text), "the README's tables should be marked with their sources"
    assert render.stale(text) == [], "run `python benchmarks/render.py` after a benchmark"
    unmarked = [line for line in render.MARKER.sub("", text).splitlines() if line.startswith("|")]
    assert unmarked == [], f"tables without a results file: {unmarked[:2]}"


def test_render_detects_a_table_that_differs_from_its_json(tmp_path: Path) -> None:
    render = _render_module()
    spec = {"columns": ["a", "b"], "rows": [["1", "2"]]}
    (tmp_path / "x.json").write_text(json.dumps({"tables": {"t": spec}}))
    stale_text = (
        "intro\n<!-- table: x.json#t -->\n| a | b |\n|---|---|\n| 1 | 3 |\n<!-- /table -->\n"
    )
    assert render.stale(stale_text, tmp_path) == ["x.json#t"]
    fresh = render.render(stale_text, tmp_path)
    assert "| 1 | 2 |" in fresh and render.stale(fresh, tmp_path) == []
    with pytest.raises(KeyError, match="no table"):
        render.render(stale_text.replace("#t", "#u"), tmp_path)
