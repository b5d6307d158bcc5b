"""`benchmarks/warm_start.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_warm_start_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("warm_start.py", "--out", str(tmp_path))
    header = (
        "| model | architecture | init | rule | atoms | tokens | FVU @0 | FVU @1/4 | FVU @1/2 |"
    )
    assert header in text and "| CE @0 | CE @1/4 | CE @1/2 | CE @end |" in text
    for init in ("default", "random activations", "ITDA", "ITDA refined", "ITDA alone"):
        assert f"| {init} |" in text
    assert "| tokens to reach | token speed-up | seconds to reach | wall-clock speed-up |" in text
    saved = json.loads((tmp_path / "warm_start.json").read_text())
    assert set(saved["tables"]) == {"budgets", "speedup"}
    assert (tmp_path / "fvu_vs_tokens_kjv-4l128-s0_topk.png").is_file()
