"""Running a benchmark script's --quick mode from the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> --quick`` in a subprocess; its stdout (fails with its stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # under `make test` two workers share the two cores: one thread each
    threads = ["--threads", "1"] if os.environ.get("PYTEST_XDIST_WORKER") else []
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *threads, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCH,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
