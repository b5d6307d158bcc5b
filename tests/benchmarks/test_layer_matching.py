"""`benchmarks/layer_matching.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_layer_matching_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("layer_matching.py", "--out", str(tmp_path))
    for measure in ("ITDA Jaccard", "linear CKA", "SVCCA", "relative", "linear regression R2"):
        assert f"| {measure} |" in text
    assert (
        "no self-pairs" in text
        and "cross-tokenizer span Jaccard" in text
        and "dictionary convergence" in text
    )
    assert "| model | tokens read | atoms per layer | from the first batch |" in text
    saved = json.loads((tmp_path / "layer_matching.json").read_text())
    assert set(saved["tables"]) == {
        "accuracy",
        "atoms",
        "model_level",
        "cross_tokenizer",
        "convergence",
    }
    assert (tmp_path / "convergence.png").is_file()
