"""`benchmarks/distributed.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_distributed_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("distributed.py", "--out", str(tmp_path))
    assert "| processes | tokens | atoms | wall s | tok/s | speed-up |" in text
    assert "2 processes built the 1-process dictionary: True" in text
    saved = json.loads((tmp_path / "distributed.json").read_text())
    assert set(saved["tables"]) == {"main", "estimate"} and saved["data"]["same"] is True
