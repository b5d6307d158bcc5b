"""The main job, on a reduced run: report folder with numbers, plots and saved ITDAs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sae_lens import SAE

from itda_lens import ITDA
from itda_lens.cli import main


def test_quick_demo_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--layers", "1", "2"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        r = results["layers"][hook]
        assert 0 < r["l0"] <= results["k"] and r["explained_variance"] > 0
        control = r["random_control"]  # same size, random training activations, same MP
        assert 0 < control["explained_variance"] < 1 and control["ce_loss_score"] > 0.5
        assert isinstance(SAE.load_from_disk(out / "itdas" / hook), ITDA)
        # each layer's dashboard, linked from the report, with the atoms' own passages
        dash = out / "dashboards" / hook
        assert (dash / "index.html").is_file()
        assert '"src":' in (dash / "data" / "shard_00000.js").read_text()
    assert (out / "growth.png").stat().st_size > 1000 and (
        out / "recon_vs_l0.png"
    ).stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "CE-loss score" in text and "[[" in text and "random-activations control" in text
    assert "(dashboards/blocks.1.hook_resid_post/index.html)" in text
    # refuses to overwrite unless told to
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
