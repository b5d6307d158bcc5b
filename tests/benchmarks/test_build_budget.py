"""`benchmarks/build_budget.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_build_budget_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("build_budget.py", "--out", str(tmp_path))
    for method in (
        "TopK SAE 8x",
        "TopK SAE 32x",
        "ITDA cos 0.9",
        "ITDA cos 0.9, patience 1k",
        "ITDA sized to 2x",
    ):
        assert f"| {method} |" in text
    assert "| L0 | patience | stops after (tokens) |" in text
    assert "every budget's dictionary is a prefix of the next one's: True" in text
    assert "every sized build read the tokens it was sized on: True" in text
    saved = json.loads((tmp_path / "build_budget.json").read_text())
    assert set(saved["tables"]) == {"budgets", "patience"}
    assert (tmp_path / "ce_vs_tokens.png").is_file() and (
        tmp_path / "atoms_vs_tokens.png"
    ).is_file()
