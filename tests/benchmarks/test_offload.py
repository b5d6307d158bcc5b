"""`benchmarks/offload.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_offload_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("offload.py", "--out", str(tmp_path))
    assert (
        "| placement | layer | blocks run (stop / full) | LM head run (stop / full) |"
        " s per batch, stop | s per batch, full | time full / stop |"
    ) in text
    assert "the offloaded model read the in-memory model's activations: True" in text
    saved = json.loads((tmp_path / "offload.json").read_text())
    assert set(saved["tables"]) == {"main"}
    data = saved["data"]
    n_layer = data["shape"]["n_layer"]
    # blocks really were offloaded to disk, and read back to the same activations
    assert data["blocks_on_disk"] >= 1 and "disk" in data["device_map"].values()
    assert data["same_offload"] is True
    rows = data["rows"]
    assert [r["placement"] for r in rows] == ["in memory"] * 3 + ["disk offload"] * 3
    for r in rows:
        # the early stop ran blocks 0..L and never the LM head; the full pass ran everything
        assert r["stop_blocks"] == r["layer"] + 1 and r["stop_head"] == 0
        assert r["full_blocks"] == n_layer and r["full_head"] == 1
        assert r["same_as_full"] is True
        assert r["stop_seconds"] > 0 and r["full_seconds"] > 0
