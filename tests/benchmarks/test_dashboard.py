"""`benchmarks/dashboard.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.helpers import run_quick


def test_dashboard_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("dashboard.py", "--out", str(tmp_path))
    assert "| atoms | k | tokens | time | tokens / s | peak extra memory | site size |" in text
    saved = json.loads((tmp_path / "dashboard.json").read_text())
    assert [r["atoms"] for r in saved["data"]["rows"]] == [256, 1024]
    assert (tmp_path / "itda_1024" / "index.html").is_file()
