"""Dashboards of an ITDA, a TopK SAE, a k-means SAE and an ITDA transcoder of a zoo model, written
by the CLI and driven in headless Chromium: the index loads from disk, a token search filters it,
an atom page opens and shows its provenance, top contexts and promoted tokens (a transcoder's read
at its input hook, its output atom's promoted tokens), and no JavaScript error is logged.
Screenshots land in ``tests/artifacts/``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from itda_lens import zoo
from itda_lens.activations import collect_activations
from itda_lens.cli import main
from itda_lens.splinterp.kmeans import fit_kmeans_sae
from itda_lens.training import train_sae

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HOOK = "blocks.2.hook_resid_post"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
KINDS = ("itda", "topk", "kmeans", "transcoder")


def chromium() -> str:
    """The browser binary, or skip with what to do about it."""
    path = os.environ.get("ITDA_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.skip(
            "no chromium: install Debian's package (`apt-get install -y chromium`, as root; "
            "`make test` does this when it can) or set ITDA_CHROMIUM to a Chromium binary"
        )
    return path


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four saved SAE folders of the zoo's default model, each with its dashboard (by the CLI)."""
    root = tmp_path_factory.mktemp("dash")
    model = zoo.load_model()
    train = zoo.load_tokens("train", 32)
    build = ["build", "--hook", HOOK, "--out", str(root / "itda"), "--k", "8"]
    assert main([*build, "--cos-threshold", "0.8", "--max-tokens", "4096"]) == 0
    cached = collect_activations(model, train, HOOK)
    topk = train_sae(
        cached, d_sae=256, k=8, training_tokens=8192, batch_size=512, model_name=zoo.DEFAULT_MODEL
    ).sae
    topk.save_model(root / "topk")
    km = fit_kmeans_sae(cached, 64, max_iter=5, model_name=zoo.DEFAULT_MODEL, progress=False)
    km.save_model(root / "kmeans")
    tc = ["build", "--hook", TC_IN, "--hook-out", TC_OUT, "--out", str(root / "transcoder")]
    assert main([*tc, "--k", "8", "--cos-threshold", "0.8", "--max-tokens", "2048"]) == 0
    for name in KINDS:
        assert main(["dashboard", str(root / name), "--seqs", "16"]) == 0
    return {name: root / name / "dashboard" for name in KINDS}


def _open_index(p: Any, binary: str, site: Path, errors: list[str]) -> tuple[Any, Any]:
    """Chromium on the site's index, once its latent table is drawn; page errors and console
    errors go to ``errors``. Returns (browser, page)."""
    browser = p.chromium.launch(executable_path=binary)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((site / "index.html").resolve().as_uri())
    page.wait_for_selector("#latents tr.row")
    return browser, page


def _index(site: Path) -> dict[str, Any]:
    text = (site / "data" / "index.js").read_text()
    return json.loads(text[len("DASH.setIndex(") : -2])


@pytest.mark.parametrize("kind", KINDS)
def test_dashboard_renders_in_chromium(kind: str, sites: dict[str, Path]) -> None:
    binary = chromium()
    from playwright.sync_api import sync_playwright

    site = sites[kind]
    index = _index(site)
    vocab, label, freq = index["vocab"], index["label"], index["freq"]
    # a latent that fired, and a search term naming its label token
    latent = max(range(len(freq)), key=lambda i: (freq[i] > 0 and label[i] >= 0, freq[i]))
    word = vocab[label[latent]].strip() or vocab[label[latent]]
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser, page = _open_index(p, binary, site, errors)
        assert page.locator("svg rect").count() > 0, "no frequency histogram"
        page.screenshot(path=str(ARTIFACTS / f"dashboard_{kind}_index.png"))
        page.fill("#search", word)
        page.wait_for_function(
            "w => [...document.querySelectorAll('#rows tr.row')].every("
            "r => r.children[1].textContent.toLowerCase().includes(w.toLowerCase()))",
            arg=word,
        )
        shown_rows = page.locator("#rows tr.row")
        assert shown_rows.count() >= 1
        page.locator(f'#rows tr.row[data-latent="{latent}"]').click()
        page.wait_for_selector("#title")
        assert f"Latent {latent}" in page.inner_text("#title")
        top = page.inner_text("#top")
        assert word in top or word.lower() in top.lower(), f"top contexts lack {word!r}"
        view = page.inner_text("#view")
        assert "Promoted tokens" in view and "Suppressed tokens" in view
        if kind in ("itda", "transcoder"):
            prov = page.inner_text("#provenance")
            assert "atom" in prov and word in prov, "the atom's own passage is missing"
        page.screenshot(path=str(ARTIFACTS / f"dashboard_{kind}_atom.png"), full_page=True)
        # an unknown latent says so instead of failing
        page.goto((site / "index.html").resolve().as_uri() + "#/latent/999999")
        page.wait_for_function("document.querySelector('#view').textContent.includes('No latent')")
        browser.close()
    assert errors == []


def test_transcoder_dashboard_shows_both_sides_in_chromium(sites: dict[str, Path]) -> None:
    """The transcoder's pages name both hooks: the index says its latents are read at the input
    hook; a latent's provenance is its pair's token in its build passage, its top contexts are
    read at the input hook and its promoted / suppressed tokens are its output atom's, exactly
    the site's data."""
    binary = chromium()
    from playwright.sync_api import sync_playwright

    site = sites["transcoder"]
    index = _index(site)
    freq, label = index["freq"], index["label"]
    latent = max(range(len(freq)), key=lambda i: freq[i])
    shard = json.loads(
        (site / "data" / f"shard_{latent // index['meta']['shard']:05d}.js").read_text()[
            len(f"DASH.addShard({latent // index['meta']['shard']},") : -2
        ]
    )
    item = shard[latent % index["meta"]["shard"]]
    vocab = index["vocab"]
    errors: list[str] = []
    with sync_playwright() as p:
        browser, page = _open_index(p, binary, site, errors)
        subtitle = page.inner_text("#subtitle")
        assert "itda_transcoder" in subtitle and f"{TC_IN} \u2192 {TC_OUT}" in subtitle
        sides = page.inner_text("#sides")
        assert f"read at its input hook {TC_IN}" in sides and TC_OUT in sides
        assert "own token" in page.inner_text("#latents thead")
        page.goto((site / "index.html").resolve().as_uri() + f"#/latent/{latent}")
        page.wait_for_selector("#title")
        assert f"own token \u201c{vocab[label[latent]]}\u201d" in page.inner_text("#title")
        view = page.inner_text("#view")
        assert f"Top activations at the input hook {TC_IN}" in view
        assert f"Promoted tokens by the output atom (at {TC_OUT})" in view
        assert f"Suppressed tokens by the output atom (at {TC_OUT})" in view
        assert f"output at {TC_OUT}) was read at sequence {item['src']['s']}" in view
        prov = page.inner_text("#provenance")
        assert vocab[label[latent]].strip() in prov
        for side in ("up", "down"):
            pills = page.locator(f"#{side} span.pill").all_inner_texts()
            # each pill: the token as JSON.stringify shows it (inner_text strips it), its effect
            assert [t.rsplit(" ", 1)[0].strip() for t in pills] == [
                json.dumps(vocab[j], ensure_ascii=False)[1:-1].strip() for j, _ in item[side]
            ]
            assert [float(t.rsplit(" ", 1)[1]) for t in pills] == pytest.approx(
                [v for _, v in item[side]], rel=1e-2
            )
        assert len(page.locator("#top .ctx").all()) == len(item["top"]) > 0
        page.screenshot(path=str(ARTIFACTS / "dashboard_transcoder_sides.png"), full_page=True)
        browser.close()
    assert errors == []
