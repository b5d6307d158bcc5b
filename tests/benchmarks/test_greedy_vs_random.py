"""`benchmarks/greedy_vs_random.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_greedy_vs_random_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("greedy_vs_random.py", "--out", str(tmp_path))
    assert "| model | k | width | greedy atoms | threshold | greedy FVU | refined FVU |" in text
    assert "| kjv-4l128-s0 | 16 | 1x |" in text and "| kjv-4l128-s0 | 16 | 2x |" in text
    saved = json.loads((tmp_path / "greedy_vs_random.json").read_text())
    assert len(saved["tables"]["main"]["rows"]) == 2
    assert (tmp_path / "fvu_vs_atoms_kjv-4l128-s0_k16.png").is_file()
