"""`benchmarks/transcoders.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick

METHODS = [
    "ITDA (judge output)",
    "ITDA, OMP encoder",
    "ITDA, GP encoder",
    "ITDA + skip",
    "ITDA + skip, LS decoder",
    "ITDA (judge input)",
    "ITDA (judge input) + skip",
    "ITDA (judge input) + skip, LS decoder",
    "TopK (sparsify)",
    "TopK + skip (sparsify)",
    "random pairs, MP",
]
ITDAS = METHODS[:8]
NUMBERS = ("ce_clean", "ce_zero", "ce", "recovered", "fvu", "l0", "fit_s", "ce_gap_to_topk")


@pytest.mark.slow
def test_transcoders_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("transcoders.py", "--out", str(tmp_path))
    for method in METHODS:
        assert f"| 1 | {method} |" in text
    assert "ITDA / TopK time" in text and "CE gap to TopK" in text
    saved = json.loads((tmp_path / "transcoders.json").read_text())
    assert saved["quick"] is True and list(saved["tables"]) == ["main"]
    assert [row[1] for row in saved["tables"]["main"]["rows"]] == METHODS
    rows = {r["method"]: r for r in saved["data"]["rows"]}
    for r in rows.values():
        for key in NUMBERS:
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["ce_clean"] < r["ce_zero"]  # the MLP matters at this layer
        assert r["fvu"] >= 0 and 0 <= r["dead"] <= r["width"]
    itda, topk, rand = (
        rows[m] for m in ("ITDA (judge output)", "TopK (sparsify)", "random pairs, MP")
    )
    k = itda["itda_k"]
    # k pursuit steps give at most k distinct atoms per token (MP may pick one twice)
    assert 0 < itda["l0"] <= k and 0 < itda["train_l0"] <= k
    assert rand["width"] == itda["width"] == topk["width"]
    assert itda["recovered"] > 0  # spliced in, the ITDA beats deleting the MLP
    assert topk["k"] == max(1, round(itda["train_l0"])) and topk["l0"] <= topk["k"]
    assert topk["ce_gap_to_topk"] == 0 and topk["time_over_topk"] == 1
    summary = saved["data"]["summary"]["cases"][0]
    assert summary["ce_gap_nats"]["ITDA (judge output)"] == pytest.approx(itda["ce"] - topk["ce"])
    assert summary["best"] == min(ITDAS, key=lambda m: rows[m]["ce"])
    assert summary["best_ce_gap_nats"] == pytest.approx(rows[summary["best"]]["ce"] - topk["ce"])
    topk_s = topk["fit_s"]
    meets = [
        m for m in ITDAS if rows[m]["ce"] - topk["ce"] <= 0.05 and rows[m]["fit_s"] <= 0.05 * topk_s
    ]
    assert summary["goal_variants"] == meets and summary["goal_met"] == bool(meets)
    # the skip variants are spliced with their skip term: they beat the plain build's FVU here
    assert rows["ITDA + skip, LS decoder"]["fvu"] < itda["fvu"]
    assert rows["TopK + skip (sparsify)"]["k"] == topk["k"]
