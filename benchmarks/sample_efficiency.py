"""Sample efficiency: held-out quality against the number of training activations, side by side.

On one zoo hook point (default model ``kjv-4l128-s0``, ``blocks.2.hook_resid_post``, d_model 128),
for N training activations in a log-spaced range (1k ... 262k, nested random subsets of one cache;
the random control's N are the last N of the same permutation, so never overlap the first N):

* PAM-SGD TopK SAE (``itda_lens.pam``: exact decoder solve per epoch + Adam encoder steps);
* the same code with the PAM step off (decoder trained by Adam too): the ablation the claim is about;
* sae_lens's own TopK trainer (``SAETrainer``: unit-norm decoder, aux-k loss, lr schedule) at the
  same batch size and the same number of samples processed: the modern baseline;
* ITDA built from the same N activations under the exact sequential rule (k = L0), sized to the SAE
  width (``target_atoms``: the threshold is searched on the N activations; where even
  cos_threshold 1 cannot give that many atoms from N activations, the table says so); its control:
  as many randomly sampled activations, with the same MP, drawn from N *other* training
  activations (the same data budget, no activation shared with the ITDA's pool). Of a draw from
  the ITDA's own N activations, a fraction atoms/N would on average be ITDA atoms (listed as
  "same-pool overlap": 100% when the ITDA keeps every activation), which is no control;
* a k-means autoencoder (width clusters, L0 = 1: where "piecewise constant" lands) and k-means +
  local PCA at matched L0 and width (``width / L0`` clusters of ``L0 - 1`` components).

All SAEs: width 8 x d_model, L0 = 16; epochs = clamp(2^19 / N, 2, 50), batch 256, so every SGD
method processes the same samples. Scored on held-out text: FVU (fraction of variance unexplained,
on held-out activations) and sae_lens's CE-loss score; plus dead latents and the number of
power-diagram regions (TopK SAEs) visited by the held-out activations. Table, JSON and plots.

    python benchmarks/sample_efficiency.py                # full run (see benchmarks/README.md)
    python benchmarks/sample_efficiency.py --quick --out bench_out/sample_efficiency_q
    python benchmarks/sample_efficiency.py --sweep-alpha   # PAM's ridge, on validation activations
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _common import bench_parser, prepare, record, series_by, table, table_spec

from itda_lens import ITDA, build_itda_from_activations, zoo
from itda_lens.activations import CachedActivations, collect_activations
from itda_lens.analysis import fvu
from itda_lens.evals import evaluate
from itda_lens.plots import line_plot
from itda_lens.splinterp.kmeans import fit_kmeans_sae, fit_local_pca_sae
from itda_lens.splinterp.pam import PAMSettings, train_pam
from itda_lens.splinterp.power import latent_geometry, power_diagram, region_ids, region_stats
from itda_lens.training import train_sae

MODEL, HOOK = "kjv-4l128-s0", "blocks.2.hook_resid_post"
BATCH = 256


def epochs_for(n: int, budget: int) -> int:
    """Epochs over N samples: about ``budget`` samples processed, between 2 and 50 epochs."""
    return max(2, min(50, budget // n))


def sae_fvu(sae: Any, x: torch.Tensor) -> float:
    with torch.no_grad():
        return fvu(x, torch.cat([sae(x[s : s + 4096]) for s in range(0, len(x), 4096)]))


def geometry(sae: Any, x: torch.Tensor) -> dict[str, Any]:
    """Dead latents (never fire on a held-out point) and power-diagram regions visited."""
    diagram = power_diagram(sae)
    geo = latent_geometry(diagram, x)
    stats = region_stats(region_ids(diagram, x))
    top1 = region_stats(region_ids(diagram, x, order=1))
    return {
        "dead_frac": float(geo.dead.double().mean()),
        "regions": stats.n_regions,
        "region_perplexity": stats.perplexity,
        "top1_cells": top1.n_regions,
        "top1_perplexity": top1.perplexity,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = zoo.load_model(MODEL)
    d = model.cfg.d_model
    width, k = args.width_mult * d, args.l0
    train = zoo.load_tokens("train", args.train_windows)
    heldout = zoo.load_tokens("heldout", args.heldout_windows)
    cached = collect_activations(model, train, HOOK)
    held = collect_activations(model, heldout, HOOK).acts
    total = cached.acts.shape[0]
    if 2 * max(args.sizes) > total:
        raise SystemExit(
            f"N={max(args.sizes)} needs {2 * max(args.sizes)} cached activations (N for the methods, "
            f"N other ones for the random control); only {total}: raise --train-windows"
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    print(
        f"{MODEL} {HOOK}: {cached.acts.shape[0]:,} training activations cached, {held.shape[0]:,} "
        f"held-out; width {width}, L0 {k}; N = {args.sizes}",
        flush=True,
    )
    meta = cached.usage_metadata(MODEL)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        sub = CachedActivations(
            cached.acts[order[:n]], cached.token_ids[order[:n]], HOOK, train.shape[1], 0.0
        )
        epochs = epochs_for(n, args.budget)
        processed = epochs * (n // BATCH) * BATCH
        saes: dict[str, tuple[Any, float] | None] = {}
        for decoder, label in (("pam", "PAM-SGD TopK"), ("adam", "Adam TopK (PAM step off)")):
            t0 = time.perf_counter()
            res = train_pam(
                sub,
                PAMSettings(
                    d_sae=width, k=k, epochs=epochs, batch_size=BATCH, decoder=decoder, lr=args.lr
                ),
                model_name=MODEL,
                progress=False,
            )
            saes[label] = (res.sae, time.perf_counter() - t0)
        t0 = time.perf_counter()
        trained = train_sae(
            sub,
            architecture="topk",
            d_sae=width,
            k=k,
            training_tokens=processed,
            batch_size=BATCH,
            lr=args.lr,
            model_name=MODEL,
        )
        saes["sae_lens TopK"] = (trained.sae, time.perf_counter() - t0)
        notes: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        try:
            itda = build_itda_from_activations(
                [sub.acts[s : s + 4096] for s in range(0, n, 4096)],
                k=k,
                target_atoms=width,
                target_sample_tokens=n,
                progress=False,
                metadata=meta,
            )
        except ValueError as err:  # the width is not reachable from N activations: say so
            saes["ITDA"] = None
            notes["ITDA"] = {"d_sae": "", "note": f"not reachable: {err}"}
            m = min(width, n)
            note = "the SAE width (no ITDA); "
        else:
            saes["ITDA"] = (itda, time.perf_counter() - t0)
            notes["ITDA"] = {"threshold": itda.require_build_record().cos_threshold, "note": ""}
            m = itda.cfg.d_sae
            note = ""
        # the control: m of N *other* activations (the end of the permutation, disjoint from sub)
        pool = cached.acts[order[total - n :]]
        control = ITDA.from_random_activations(pool, m, k, seed=n, metadata=meta)
        saes["random activations, MP"] = (control, 0.0)
        notes["random activations, MP"] = {
            "same-pool overlap": m / n,
            "note": f"{note}drawn from {n:,} other training activations",
        }
        if n >= width:
            t0 = time.perf_counter()
            saes["k-means (L0 = 1)"] = (
                fit_kmeans_sae(
                    sub, width, max_iter=args.kmeans_iters, model_name=MODEL, progress=False
                ),
                time.perf_counter() - t0,
            )
        clusters = width // k
        if n >= clusters * k:
            t0 = time.perf_counter()
            saes["k-means + local PCA"] = (
                fit_local_pca_sae(
                    sub,
                    clusters,
                    k - 1,
                    max_iter=args.kmeans_iters,
                    model_name=MODEL,
                    progress=False,
                ),
                time.perf_counter() - t0,
            )
        for label, fitted in saes.items():
            if fitted is None:
                rows.append({"N": n, "epochs": "", "method": label, **notes[label]})
                continue
            sae, seconds = fitted
            ev = evaluate(sae, model, heldout[: args.ce_windows])
            row = {
                "N": n,
                "epochs": epochs if "TopK" in label else "",
                "method": label,
                "d_sae": sae.cfg.d_sae,
                "fvu": sae_fvu(sae, held),
                "ce_loss_score": ev["ce_loss_score"],
                "l0": ev["l0"],
                "fit_s": round(seconds, 1),
            }
            if "TopK" in label:
                row.update(geometry(sae, held))
            row.update(notes.get(label, {}))
            rows.append(row)
        print(
            f"  N={n:,} ({epochs} epochs): "
            + ", ".join(
                f"{r['method']} FVU {r['fvu']:.3f}" for r in rows if r["N"] == n and "fvu" in r
            ),
            flush=True,
        )
    return rows


def sweep_alpha(args: argparse.Namespace) -> list[dict[str, Any]]:
    """PAM's decoder ridge on *validation* activations (training windows outside every subset)."""
    model = zoo.load_model(MODEL)
    width, k = args.width_mult * model.cfg.d_model, args.l0
    cached = collect_activations(model, zoo.load_tokens("train", args.train_windows), HOOK)
    order = torch.randperm(cached.acts.shape[0], generator=torch.Generator().manual_seed(0))
    val = cached.acts[order[-8192:]]
    rows = []
    for n in args.sweep_sizes:
        sub = CachedActivations(cached.acts[order[:n]], cached.token_ids[order[:n]], HOOK, 128, 0.0)
        epochs = epochs_for(n, args.sweep_budget)
        row: dict[str, Any] = {"N": n, "epochs": epochs}
        for alpha in args.alphas:
            settings = PAMSettings(d_sae=width, k=k, epochs=epochs, batch_size=BATCH, alpha=alpha)
            row[f"PAM alpha {alpha:g}"] = round(
                sae_fvu(train_pam(sub, settings, progress=False).sae, val), 3
            )
        adam = PAMSettings(d_sae=width, k=k, epochs=epochs, batch_size=BATCH, decoder="adam")
        row["Adam (PAM off)"] = round(sae_fvu(train_pam(sub, adam, progress=False).sae, val), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["N"], r["method"]): r for r in rows}
    lines = []
    for n in sorted({r["N"] for r in rows}):
        pam, adam, sl = (
            by[(n, m)] for m in ("PAM-SGD TopK", "Adam TopK (PAM step off)", "sae_lens TopK")
        )
        itda, rand = by[(n, "ITDA")], by[(n, "random activations, MP")]
        line = (
            f"N={n}: FVU PAM {pam['fvu']:.3f} vs Adam (same code) {adam['fvu']:.3f} "
            f"(ratio {pam['fvu'] / adam['fvu']:.2f}) vs sae_lens TopK {sl['fvu']:.3f} "
            f"(ratio {pam['fvu'] / sl['fvu']:.2f}); "
        )
        if "fvu" in itda:
            line += (
                f"ITDA {itda['fvu']:.3f} ({itda['d_sae']} atoms, threshold "
                f"{itda['threshold']:.4f}) vs {rand['d_sae']} random activations of {n} others "
                f"{rand['fvu']:.3f} (a draw from the ITDA's own {n} would share "
                f"{rand['same-pool overlap']:.0%} of its atoms); "
            )
        else:
            line += f"ITDA {itda['note']}; "
        line += (
            f"CE score PAM {pam['ce_loss_score']:.3f} / Adam {adam['ce_loss_score']:.3f} / "
            f"sae_lens {sl['ce_loss_score']:.3f}"
            + (f" / ITDA {itda['ce_loss_score']:.3f}" if "fvu" in itda else "")
            + f" / random {rand['ce_loss_score']:.3f}"
        )
        lines.append(line)
    return lines


COLUMNS = [
    "N",
    "method",
    "epochs",
    "d_sae",
    "fvu",
    "ce_loss_score",
    "l0",
    "dead",
    "regions",
    "top-1 cells (perplexity)",
    "fit_s",
    "threshold",
    "same-pool overlap",
    "note",
]


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/sample_efficiency")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--sweep-alpha",
        action="store_true",
        help="only PAM's ridge sweep on validation activations",
    )
    args = parser.parse_args()
    # training windows: at least twice the largest N non-special tokens (for the random control)
    if args.quick:
        args.sizes, args.width_mult, args.l0, args.budget = [512, 2048], 2, 8, 2**14
        args.train_windows, args.heldout_windows, args.ce_windows, args.kmeans_iters = 40, 8, 8, 5
    else:
        args.sizes, args.width_mult, args.l0 = [1024, 4096, 16384, 65536, 262144], 8, 16
        args.budget = 2**19
        args.train_windows, args.heldout_windows, args.ce_windows, args.kmeans_iters = (
            4400,
            64,
            32,
            10,
        )
    out = prepare(args)
    t0 = time.perf_counter()
    if args.sweep_alpha:
        args.alphas = (0.1, 16.0, 64.0, 256.0)
        args.sweep_sizes = args.sizes[:2] if args.quick else [1024, 4096, 65536]
        args.sweep_budget = args.budget // 2
        rows = sweep_alpha(args)
        print(table(rows, list(rows[0])))
        (out / "alpha_sweep.json").write_text(json.dumps(rows, indent=2))
        return
    rows = run(args)
    shown = [
        {
            **r,
            **{c: f"{r[c]:.3f}" for c in ("fvu", "ce_loss_score") if c in r},
            "l0": f"{r['l0']:.1f}" if "l0" in r else "",
            "dead": f"{r['dead_frac']:.1%}" if "dead_frac" in r else "",
            "regions": r.get("regions", ""),
            "top-1 cells (perplexity)": f"{r['top1_cells']} ({r['top1_perplexity']:.0f})"
            if "top1_cells" in r
            else "",
            "threshold": f"{r['threshold']:.4f}" if "threshold" in r else "",
            "same-pool overlap": f"{r['same-pool overlap']:.1%}"
            if "same-pool overlap" in r
            else "",
        }
        for r in rows
    ]
    print(table(shown, COLUMNS))
    summary = summarise(rows)
    print("\n" + "\n".join(summary))
    for metric, label in (("fvu", "held-out FVU"), ("ce_loss_score", "CE-loss score (held-out)")):
        line_plot(
            series_by([r for r in rows if metric in r], "method", "N", metric),
            out / f"{metric}_vs_n.png",
            xlabel="training activations N",
            ylabel=label,
            title=f"{MODEL} {HOOK}: sample efficiency",
            logx=True,
        )
    record(
        "sample_efficiency",
        args,
        {"main": table_spec(shown, COLUMNS)},
        {"rows": rows, "summary": summary, "settings": vars(args)},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
