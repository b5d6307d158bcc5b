"""`benchmarks/build.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_build_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("build.py", "--out", str(tmp_path))  # not into the checkout
    assert "dictionary / forward" in text
    assert "exact rule: same dictionary at every batch size: True" in text
