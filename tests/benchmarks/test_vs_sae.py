"""`benchmarks/vs_sae.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_vs_sae_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("vs_sae.py", "--out", str(tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| model | width | L0 |"))
    for column in (
        "ITDA",
        "ITDA refined",
        "random acts",
        "TopK",
        "AbsTopK",
        "BatchTopK",
        "MP SAE",
        "TopK on ITDA's tokens",
        "MP/TopK dec",
        "OMP/ITDA",
        "Gaussian",
    ):
        assert f"| {column} |" in header
    for method in ("ITDA (MP)", "ITDA refined (MP)", "MP SAE", "AbsTopK SAE"):
        assert f"| {method} |" in text, "probing and SAEBench core rows name every method"
    saved = json.loads((tmp_path / "vs_sae.json").read_text())
    assert set(saved["tables"]) == {"main", "probing", "core"}
    assert list(tmp_path.glob("ce_vs_l0_*.png")) and list(tmp_path.glob("ce_vs_wallclock_*.png"))
