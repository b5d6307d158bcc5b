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
