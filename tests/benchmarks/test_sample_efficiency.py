"""`benchmarks/sample_efficiency.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_sample_efficiency_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("sample_efficiency.py", "--out", str(tmp_path))
    for method in (
        "PAM-SGD TopK",
        "Adam TopK (PAM step off)",
        "sae_lens TopK",
        "ITDA",
        "random activations, MP",
        "k-means (L0 = 1)",
        "k-means + local PCA",
    ):
        assert f"| {method} |" in text
    assert "N=2048: FVU PAM" in text and "would share" in text
    assert "| same-pool overlap | note |" in text
    saved = json.loads((tmp_path / "sample_efficiency.json").read_text())
    assert set(saved["tables"]) == {"main"}
    assert (tmp_path / "fvu_vs_n.png").is_file() and (tmp_path / "ce_loss_score_vs_n.png").is_file()
