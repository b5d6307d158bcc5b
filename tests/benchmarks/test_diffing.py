"""`benchmarks/diffing.py`: its --quick run (the same code and tables as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_diffing_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("diffing.py", "--out", str(tmp_path))
    assert "| score | layer 1 | layer 2 | seconds |" in text
    saved = json.loads((tmp_path / "diffing.json").read_text())
    assert set(saved["tables"]) == {"planted", "domain_shift"}
    rows = {r["score"]: r for r in saved["data"]["planted"]["rows"]}
    for name in ("ITDA: base_gap", "|h_ft - h_base|", "output KL", "TopK SAE: sae_gap"):
        assert name in rows
        for hook in saved["data"]["hooks"]:
            assert 0 <= rows[name][hook]["auroc"] <= 1 and 0 <= rows[name][hook]["p50"] <= 1
    # on the planted change the ITDA score finds the trigger well above chance
    assert rows["ITDA: base_gap"]["blocks.2.hook_resid_post"]["auroc"] > 0.75
    shift = saved["data"]["domain_shift"]
    assert 0 < shift["base_rate"] < 0.5 and len(shift["rows"]) == len(rows) - 2
