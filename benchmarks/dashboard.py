"""Dashboard cost: time and peak memory of ``write_dashboard`` for ITDAs of several sizes over
100k tokens of the zoo's default model, split into the streaming pass (forward, encoding and the
per-latent statistics) and writing the site; plus the site's size. The atoms are training
activations drawn at random (the dashboard's cost does not depend on how atoms were chosen, only on
their number and k). Also saves the README's screenshots (index and an atom page) when Chromium is
available.

    python benchmarks/dashboard.py            # full run (1,024 and 16,384 atoms; ~10 minutes)
    python benchmarks/dashboard.py --quick    # reduced run, same code and table
    python benchmarks/dashboard.py --screenshots-only
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from _common import bench_parser, fmt_bytes, measure, prepare, record, table, table_spec

from itda_lens import ITDA, build_itda, zoo
from itda_lens.activations import collect_activations
from itda_lens.dashboard import write_dashboard

HOOK = "blocks.2.hook_resid_post"
K = 16
RESULTS = Path(__file__).parent / "results"


def site_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def screenshots(model: object, out: Path, word: str) -> list[str]:
    """The index and one atom page of a greedy ITDA (with its atoms' source passages), as the
    README shows them (skipped without Chromium)."""
    binary = shutil.which("chromium")
    if binary is None:
        print("no chromium: screenshots skipped")
        return []
    from playwright.sync_api import sync_playwright

    train = zoo.load_tokens("train", 256)
    itda = build_itda(model, train, HOOK, k=K, cos_threshold=0.85, progress=False)[HOOK]
    site = out / "greedy"
    write_dashboard(
        itda,
        model,
        zoo.load_tokens("heldout", 339),
        site,
        provenance_tokens=train,
        data_name="kjv:heldout",
        overwrite=True,
        progress=False,
    )
    out = [RESULTS / "dashboard_index.png", RESULTS / "dashboard_atom.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto((site / "index.html").resolve().as_uri())
        page.wait_for_selector("#latents tr.row")
        page.screenshot(path=str(out[0]))
        page.fill("#search", word)
        page.wait_for_timeout(300)
        page.locator("#rows tr.row").first.click()
        page.wait_for_selector("#title")
        page.screenshot(path=str(out[1]))
        browser.close()
    return [str(p.relative_to(RESULTS.parent.parent)) for p in out]


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/dashboard")
    parser.add_argument("--screenshots-only", action="store_true", help="only the README's PNGs")
    args = parser.parse_args()
    out = prepare(args)
    t0 = time.perf_counter()
    model = zoo.load_model(zoo.DEFAULT_MODEL)
    if args.screenshots_only:
        print(screenshots(model, out, " the"))
        return
    sizes = [256, 1024] if args.quick else [1024, 16384]
    n_heldout = 16 if args.quick else 339
    n_train = 16 if args.quick else 443
    pool_windows = 64 if args.quick else 512
    heldout = zoo.load_tokens("heldout", n_heldout)
    train = zoo.load_tokens("train", pool_windows + n_train)
    tokens = torch.cat([heldout, train[pool_windows:]])  # windows the atoms were not drawn from
    pool = collect_activations(model, train[:pool_windows], HOOK)
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for n in sizes:
        pick = torch.randperm(pool.acts.shape[0], generator=g)[:n]
        itda = ITDA.from_atoms(
            pool.acts[pick],
            K,
            token_ids=pool.token_ids[pick],
            hook_name=HOOK,
            model_name=zoo.DEFAULT_MODEL,
            context_size=tokens.shape[1],
        )
        site = out / f"itda_{n}"
        m = measure(
            lambda itda=itda, site=site: write_dashboard(
                itda, model, tokens, site, data_name="kjv", overwrite=True, progress=False
            )
        )
        meta_rows = {
            "atoms": n,
            "k": K,
            "tokens": tokens.numel(),
            "seconds": m.seconds,
            "tokens_per_s": tokens.numel() / m.seconds,
            "peak_extra_bytes": m.peak_extra_bytes,
            "site_bytes": site_bytes(site),
        }
        rows.append(meta_rows)
        print(meta_rows, flush=True)
    shots = [] if args.quick else screenshots(model, out, " the")
    shown = [
        {
            "atoms": f"{r['atoms']:,}",
            "k": r["k"],
            "tokens": f"{r['tokens']:,}",
            "time": f"{r['seconds'] / 60:.1f} min",
            "tokens / s": f"{r['tokens_per_s']:,.0f}",
            "peak extra memory": fmt_bytes(r["peak_extra_bytes"]),
            "site size": fmt_bytes(r["site_bytes"]),
        }
        for r in rows
    ]
    cols = ["atoms", "k", "tokens", "time", "tokens / s", "peak extra memory", "site size"]
    print(table(shown, cols))
    record(
        "dashboard",
        args,
        {"cost": table_spec(shown, cols)},
        {"rows": rows, "screenshots": shots},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
