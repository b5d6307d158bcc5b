"""`benchmarks/layer_matching.py`: its --quick run (the same code and table as the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_quick


@pytest.mark.slow
def test_layer_matching_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("layer_matching.py", "--out", str(tmp_path))
    for measure in (
        "ITDA Jaccard", "ITDA transfer", "ITDA probe support Jaccard", "linear CKA", "SVCCA",
        "relative", "linear regression R2", "mutual kNN", "CKNNA", "debiased CKA", "Procrustes",
    ):  # fmt: skip
        assert f"| {measure} |" in text
    assert (
        "no self-pairs" in text
        and "accuracy without self-pairs across tokenizers" in text
        and "dictionary convergence" in text
    )
    assert "| model | tokens read | atoms per layer | from the first batch |" in text
    saved = json.loads((tmp_path / "layer_matching.json").read_text())
    assert set(saved["tables"]) == {
        "accuracy",
        "atoms",
        "model_level",
        "path_dependence",
        "cross_tokenizer",
        "cross_tokenizer_accuracy",
        "convergence",
    }
    # across tokenizers every measure is scored, and the control (one tokenizer through the same
    # span path) too
    cross = saved["data"]["cross_tokenizer"]
    assert [r["measure"] for r in cross["accuracy"]][:3] == [
        "ITDA span Jaccard", "ITDA transfer", "ITDA probe support Jaccard"
    ]  # fmt: skip
    assert len(cross["accuracy"]) == len(cross["control"]["accuracy"]) == 11
    assert cross["aligned_heldout_tokens"] > 0
    assert (tmp_path / "convergence.png").is_file()
    # the window-by-window build behind the flipped verdict is build_itda's, label for label
    assert saved["data"]["path_dependence"]["window_by_window_equals_build_itda"] is True
    flipped = saved["data"]["path_dependence"]["jaccard"]["same model, one early verdict flipped"]
    assert all(0 < v <= 1 for v in flipped)


@pytest.mark.slow
def test_layer_matching_reference_quick(tmp_path: Path) -> None:
    text = run_quick("layer_matching_reference.py", "--out", str(tmp_path))
    assert "| reference protocol |" in text and "| size alone (min / max atoms) |" in text
    saved = json.loads((tmp_path / "layer_matching_reference.json").read_text())
    fam = saved["data"]["families"]["8l128"]
    ref = fam["reference protocol"]
    # the start-up dictionary holds d_model atoms of the first batch; every dictionary is larger
    assert min(n for v in ref["atoms"].values() for n in v) > 128
    assert 0.9 <= ref["first_batch_share"] <= 1
    for acc in ref["accuracy"].values():
        assert 0 <= acc["without self-pairs"] <= acc["with self-pairs (reference)"] <= 1


@pytest.mark.slow
def test_layer_matching_stability_quick(tmp_path: Path) -> None:
    text = run_quick("layer_matching.py", "--part", "stability", "--out", str(tmp_path))
    assert "| 4 x 128 (2 seeds) | another order (seed 1) |" in text
    saved = json.loads((tmp_path / "layer_matching_stability.json").read_text())
    rows = saved["data"]["rows"]
    assert rows[0]["largest change of a transfer value"] == "0.000"  # the reference order
    assert all(0 <= float(r["ITDA transfer"]) <= 1 for r in rows)
    # the other order's dictionaries differ (else the check would be empty)
    orders = saved["data"]["orders"]
    assert orders["4 x 128|0"]["transfer"] != orders["4 x 128|1"]["transfer"]
