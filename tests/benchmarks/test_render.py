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


def test_readme_prose_numbers_have_sources() -> None:
    """Every number in both READMEs' prose sits in a claims block naming the results it comes
    from, and appears in them (``render.unsourced_claims``)."""
    render = _render_module()
    for readme in render.READMES:
        problems = render.unsourced_claims(readme.read_text())
        assert problems == [], f"{readme.name}: {problems[:5]}"


def test_claims_check_catches_wrong_and_unsourced_numbers(tmp_path: Path) -> None:
    render = _render_module()
    (tmp_path / "r.json").write_text(
        json.dumps(
            {"tables": {"t": {"columns": ["x"], "rows": [["1,234"]]}}, "data": {"v": 0.4567}}
        )
    )
    good = "<!-- claims: r.json -->\nIt read 1,234 tokens at 0.457 and 45.7%.\n<!-- /claims -->\n"
    assert render.unsourced_claims(good, tmp_path) == []
    wrong = good.replace("0.457", "0.466")
    assert any("0.466" in p for p in render.unsourced_claims(wrong, tmp_path))
    loose = good + "Outside it took 12.5 s.\n"
    assert any("12.5 s" in p for p in render.unsourced_claims(loose, tmp_path))
    settings = good + "With `cos_threshold=0.9` at 8x d_model.\n"
    assert render.unsourced_claims(settings, tmp_path) == []


def test_results_record_commands_that_exist() -> None:
    for path in sorted((BENCH / "results").glob("*.json")):
        command = json.loads(path.read_text())["command"].split()
        assert command[0] == "python" and (BENCH.parent / command[1]).is_file(), (
            f"{path.name} records {' '.join(command)}"
        )


def test_readmes_name_files_that_exist() -> None:
    import re

    root = BENCH.parent
    for readme in (root / "README.md", BENCH / "README.md"):
        for name in set(
            re.findall(
                r"\b(?:tests|benchmarks|itda_lens)/[\w/.-]*\.(?:py|json|ipynb)", readme.read_text()
            )
        ):
            assert (root / name).is_file() or (root / "benchmarks" / name).is_file(), (
                f"{readme.relative_to(root)} names {name}, which does not exist"
            )
