"""`benchmarks/pursuit.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_pursuit_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("pursuit.py", "--out", str(tmp_path))  # not into the checkout
    assert "MP / reference" in text and "| 65536 | 768 |" in text
    assert "100.0%" in text, "our MP must equal the literal algorithm on the benchmark tokens"
