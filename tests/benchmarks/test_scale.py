"""`benchmarks/scale.py`: its --quick run (the same code and tables as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_scale_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("scale.py", "--out", str(tmp_path))  # not into the checkout
    assert "x literal" in text and "exact: steps / 1k tokens" in text
    data = json.loads((tmp_path / "scale.json").read_text())["data"]
    assert {r["atoms"] for r in data["encode"]} == {1024, 4096}
    assert all(r["same_codes_as_literal"] >= 0.9 for r in data["encode"])
    assert all(r["build_tok_s"] > 0 and r["atoms"] > 0 for r in data["build"])
    assert all(r["exact_steps_per_1k"] > 0 and r["batch_ops_per_1k"] > 0 for r in data["gpu"])


@pytest.mark.slow
def test_scale_budget_sweep_quick(tmp_path: Path) -> None:
    run_quick("scale.py", "--out", str(tmp_path), "--budget-sweep", "1MiB", "64MiB")
    rows = json.loads((tmp_path / "scale_budget.json").read_text())["data"]["encode"]
    assert [r["budget"] for r in rows] == ["1MiB", "64MiB"]
    # 4,096 atoms: a cache under 1 MiB, the full int16 Gram (32 MiB) under 64 MiB; same codes
    assert rows[0]["rows"].startswith("cache") and rows[1]["rows"] == "full int16"
    assert all(r["same_codes_as_literal"] >= 0.9 for r in rows)


@pytest.mark.slow
def test_scale_gpu_only_quick(tmp_path: Path) -> None:
    run_quick("scale.py", "--out", str(tmp_path), "--gpu-only")
    rows = json.loads((tmp_path / "scale_gpu.json").read_text())["data"]["gpu"]
    assert [r["atoms"] for r in rows] == [1024, 4096]
    # filled to about half (512-token steps), so the segment still reads and adds atoms
    assert all(0 < r["atoms_at_start"] < r["atoms"] for r in rows)
    assert all(r["exact_steps_per_1k"] > r["batch_steps_per_1k"] > 0 for r in rows)
