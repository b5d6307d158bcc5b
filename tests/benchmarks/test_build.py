"""`benchmarks/build.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_build_benchmark_quick() -> None:
    text = run_quick("build.py")
    assert "dictionary / forward" in text
    assert "exact rule: same dictionary at every batch size: True" in text
