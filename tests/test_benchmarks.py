"""Every benchmark script's --quick run: same code and table as the full run, in under two minutes."""

from __future__ import annotations

import json
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
    assert "dictionary / forward" in text
    assert "exact rule: same dictionary at every batch size: True" in text


@pytest.mark.slow
def test_vs_sae_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("vs_sae.py", "--out", str(tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| model | width | L0 |"))
    for column in (
        "ITDA",
        "ITDA refined",
        "random acts",
        "TopK",
        "AbsTopK",
        "BatchTopK",
        "MP SAE",
        "TopK on ITDA's tokens",
        "MP/TopK dec",
        "OMP/ITDA",
        "Gaussian",
    ):
        assert f"| {column} |" in header
    for method in ("ITDA (MP)", "ITDA refined (MP)", "MP SAE", "AbsTopK SAE"):
        assert f"| {method} |" in text, "probing and SAEBench core rows name every method"
    saved = json.loads((tmp_path / "vs_sae.json").read_text())
    assert set(saved["tables"]) == {"main", "probing", "core"}
    assert list(tmp_path.glob("ce_vs_l0_*.png")) and list(tmp_path.glob("ce_vs_wallclock_*.png"))


@pytest.mark.slow
def test_layer_matching_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("layer_matching.py", "--out", str(tmp_path))
    for measure in ("ITDA Jaccard", "linear CKA", "SVCCA", "relative", "linear regression R2"):
        assert f"| {measure} |" in text
    assert (
        "no self-pairs" in text
        and "cross-tokenizer span Jaccard" in text
        and "dictionary convergence" in text
    )
    assert "| model | tokens read | atoms per layer | from the first batch |" in text
    saved = json.loads((tmp_path / "layer_matching.json").read_text())
    assert set(saved["tables"]) == {
        "accuracy",
        "atoms",
        "model_level",
        "cross_tokenizer",
        "convergence",
    }
    assert (tmp_path / "convergence.png").is_file()


@pytest.mark.slow
def test_sample_efficiency_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("sample_efficiency.py", "--out", str(tmp_path))
    for method in (
        "PAM-SGD TopK",
        "Adam TopK (PAM step off)",
        "sae_lens TopK",
        "ITDA",
        "random activations, MP",
        "k-means (L0 = 1)",
        "k-means + local PCA",
    ):
        assert f"| {method} |" in text
    assert "N=2048: FVU PAM" in text and "would share" in text
    assert "| same-pool overlap | note |" in text
    saved = json.loads((tmp_path / "sample_efficiency.json").read_text())
    assert set(saved["tables"]) == {"main"}
    assert (tmp_path / "fvu_vs_n.png").is_file() and (tmp_path / "ce_loss_score_vs_n.png").is_file()


@pytest.mark.slow
def test_build_budget_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("build_budget.py", "--out", str(tmp_path))
    for method in (
        "TopK SAE 8x",
        "TopK SAE 32x",
        "ITDA cos 0.9",
        "ITDA cos 0.9, patience 1k",
        "ITDA sized to 2x",
    ):
        assert f"| {method} |" in text
    assert "| L0 | patience | stops after (tokens) |" in text
    assert "every budget's dictionary is a prefix of the next one's: True" in text
    assert "every sized build read the tokens it was sized on: True" in text
    saved = json.loads((tmp_path / "build_budget.json").read_text())
    assert set(saved["tables"]) == {"budgets", "patience"}
    assert (tmp_path / "ce_vs_tokens.png").is_file() and (
        tmp_path / "atoms_vs_tokens.png"
    ).is_file()


@pytest.mark.slow
def test_greedy_vs_random_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("greedy_vs_random.py", "--out", str(tmp_path))
    assert "| model | k | width | greedy atoms | threshold | greedy FVU | refined FVU |" in text
    assert "| kjv-4l128-s0 | 16 | 1x |" in text and "| kjv-4l128-s0 | 16 | 2x |" in text
    saved = json.loads((tmp_path / "greedy_vs_random.json").read_text())
    assert len(saved["tables"]["main"]["rows"]) == 2
    assert (tmp_path / "fvu_vs_atoms_kjv-4l128-s0_k16.png").is_file()


def _render_module():
    sys.path.insert(0, str(BENCH))
    try:
        import render
    finally:
        sys.path.remove(str(BENCH))
    return render


def test_readme_tables_are_rendered_from_committed_results() -> None:
    render = _render_module()
    text = (BENCH / "README.md").read_text()
    assert render.MARKER.search(text), "the README's tables should be marked with their sources"
    assert render.stale(text) == [], "run `python benchmarks/render.py` after a benchmark"
    unmarked = [line for line in render.MARKER.sub("", text).splitlines() if line.startswith("|")]
    assert unmarked == [], f"tables without a results file: {unmarked[:2]}"


def test_render_detects_a_table_that_differs_from_its_json(tmp_path: Path) -> None:
    render = _render_module()
    spec = {"columns": ["a", "b"], "rows": [["1", "2"]]}
    (tmp_path / "x.json").write_text(json.dumps({"tables": {"t": spec}}))
    stale_text = (
        "intro\n<!-- table: x.json#t -->\n| a | b |\n|---|---|\n| 1 | 3 |\n<!-- /table -->\n"
    )
    assert render.stale(stale_text, tmp_path) == ["x.json#t"]
    fresh = render.render(stale_text, tmp_path)
    assert "| 1 | 2 |" in fresh and render.stale(fresh, tmp_path) == []
    with pytest.raises(KeyError, match="no table"):
        render.render(stale_text.replace("#t", "#u"), tmp_path)


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


@pytest.mark.slow
def test_distributed_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("distributed.py", "--out", str(tmp_path))
    assert "| processes | tokens | atoms | wall s | tok/s | speed-up |" in text
    assert "2 processes built the 1-process dictionary: True" in text
    saved = json.loads((tmp_path / "distributed.json").read_text())
    assert set(saved["tables"]) == {"main", "estimate"} and saved["data"]["same"] is True


def test_dashboard_benchmark_quick(tmp_path: Path) -> None:
    text = run_quick("dashboard.py", "--out", str(tmp_path))
    assert "| atoms | k | tokens | time | tokens / s | peak extra memory | site size |" in text
    saved = json.loads((tmp_path / "dashboard.json").read_text())
    assert [r["atoms"] for r in saved["data"]["rows"]] == [256, 1024]
    assert (tmp_path / "itda_1024" / "index.html").is_file()
