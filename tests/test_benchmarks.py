"""Every benchmark script's --quick run: same code and table as the full run, in under two minutes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCH,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_pursuit_benchmark_quick() -> None:
    text = run_quick("pursuit.py")
    assert "MP / reference" in text and "| 65536 | 768 |" in text
    assert "100.0%" in text, "our MP must equal the literal algorithm on the benchmark tokens"


@pytest.mark.slow
def test_build_benchmark_quick() -> None:
    text = run_quick("build.py")
    assert "dictionary / forward" in text and "same dictionary: True" in text
