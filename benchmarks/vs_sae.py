"""ITDA against trained SAEs and honest controls, side by side: quality, time and data.

For each model (the default zoo model and a larger one, at a middle layer's resid_post), each L0
(about 2%, 6%, 12% and 25% of d_model) and each width (8x and 32x d_model):

* ITDA built by our builder the paper's way (k = L0, cos_threshold = 0.9, at most 32x d_model
  atoms, batches of 8 sequences, stopping once 32k tokens in a row added no atom, or after 262k
  tokens), cropped to the width (first atoms in insertion order);
* TopK SAEs (both widths) and BatchTopK SAEs (8x width; the 32x ones would push the run past
  40 minutes) trained with sae_lens's own trainer (``SAETrainer``) on activations of the same model,
  hook and training windows (budget: 500k activations), and the TopK SAE trained on only the
  activations the ITDA read;
* controls with the same encoder (signed MP, k = L0) and the same size as the ITDA: randomly sampled
  training activations (ITDA without the greedy selection), random Gaussian atoms, the trained TopK
  SAE's decoder rows, and OMP instead of MP over the ITDA's atoms.

Each is scored with sae_lens ``run_evals`` on held-out windows (CE-loss score, KL score, explained
variance, L0); k-sparse probing (SAEBench's procedure, zoo-corpus tasks) at one L0 and the 8x width;
SAEBench ``core`` for one of each kind. Wall-clock counts the model forward for the tokens each
method needs; tokens are activations read. Writes a table, JSON and two plots.

    python benchmarks/vs_sae.py --out bench_out/vs_sae            # full run (~35 min on 2 cores)
    python benchmarks/vs_sae.py --quick --out bench_out/vs_sae_q  # reduced run (< 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, prepare, series_by, table

from itda_lens import ITDA, build_itda, zoo
from itda_lens.evals import evaluate_all
from itda_lens.plots import line_plot
from itda_lens.probing import probe_data
from itda_lens.sae_training import (
    CachedActivations,
    collect_activations,
    train_sae,
    usage_metadata,
)

FULL = [("kjv-4l128-s0", "blocks.2.hook_resid_post"), ("kjv-6l160-s0", "blocks.3.hook_resid_post")]
L0_FRACTIONS = (0.025, 0.0625, 0.125, 0.25)
WIDTHS = (8, 32)
COS_THRESHOLD = 0.9
PATIENCE = 32_768  # tokens without a new atom after which the build counts as converged


def controls(itda: ITDA, cached: CachedActivations, k: int, seed: int) -> dict[str, ITDA]:
    """Same encoder and size as ``itda``, different atoms."""
    n, d = itda.cfg.d_sae, itda.cfg.d_in
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(cached.acts.shape[0], generator=g)[:n]
    meta = usage_metadata(itda)
    return {
        "ITDA atoms, OMP": ITDA.from_atoms(
            itda.W_dec, k, encoder="omp", labels=itda.atom_labels, metadata=meta
        ),
        "random activations, MP": ITDA.from_atoms(
            cached.acts[rows],
            k,
            labels=torch.stack([rows, -torch.ones_like(rows)], 1),
            metadata=meta,
        ),
        "Gaussian atoms, MP": ITDA.from_atoms(torch.randn(n, d, generator=g), k, metadata=meta),
    }


def run_model(
    name: str, hook: str, args: argparse.Namespace, probe_cache: dict
) -> list[dict[str, Any]]:
    model = zoo.load_model(name)
    tokenizer = zoo.model_card(name)["tokenizer"]
    d = model.cfg.d_model
    l0s = [max(2, round(f * d)) for f in (args.l0_fractions or L0_FRACTIONS)]
    widths = [w * d for w in (args.widths or WIDTHS)]
    train = zoo.load_tokens("train", args.train_windows, tokenizer=tokenizer)
    heldout = zoo.load_tokens("heldout", args.heldout_windows, tokenizer=tokenizer)
    cached = collect_activations(model, train, hook)
    per_token_forward = cached.forward_seconds / cached.acts.shape[0]
    print(
        f"\n{name} {hook}: d_model {d}, L0 {l0s}, widths {widths}; cached {cached.acts.shape[0]:,} activations "
        f"({cached.tokens_per_second:,.0f}/s forward)",
        flush=True,
    )
    probe_l0 = l0s[len(l0s) // 2]
    if tokenizer not in probe_cache:
        probe_cache[tokenizer] = probe_data(
            n_train=args.probe_train, n_test=args.probe_test, tokenizer=tokenizer
        )
    probe = probe_cache[tokenizer]
    rows: list[dict[str, Any]] = []
    raw_feats = evaluate_all(
        ITDA.from_atoms(
            torch.eye(d), d, hook_name=hook, model_name=name, context_size=train.shape[1]
        ),
        model,
        heldout,
        probe=probe,
    )  # identity dictionary = probing the raw activations
    rows.append(
        {
            "model": name,
            "method": "raw activations (identity)",
            "width": d,
            "L0": d,
            "atoms": d,
            "probe": raw_feats["probing"]["mean"],
            "ce_loss_score": raw_feats["run_evals"]["ce_loss_score"],
            "explained_variance": raw_feats["run_evals"]["explained_variance"],
            "wall_s": 0.0,
            "tokens": 0,
        }
    )
    for k in l0s:
        t0 = time.perf_counter()
        built = build_itda(
            model,
            train[: args.build_windows],
            hook,
            k=k,
            cos_threshold=COS_THRESHOLD,
            max_atoms=max(widths),
            batch_size=8,
            patience_tokens=PATIENCE,
            progress=False,
            model_name=name,
            dataset_path="kjv:train",
        )
        build_meta = built.cfg.metadata.itda_builder
        itda_seconds = build_meta["forward_seconds"] + build_meta["dictionary_seconds"]
        itda_tokens = build_meta["tokens_seen"]
        print(
            f"  L0={k}: ITDA {built.cfg.d_sae} atoms from {itda_tokens:,} tokens in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        for width in widths:
            itda = built.crop(min(width, built.cfg.d_sae))
            saes: dict[str, tuple[Any, float, int]] = {
                "ITDA (MP)": (itda, itda_seconds, itda_tokens)
            }
            for label, sae in controls(itda, cached, k, seed=k * 7919 + width).items():
                saes[label] = (sae, 0.0, 0)
            archs = (
                (("topk", "TopK SAE"), ("batchtopk", "BatchTopK SAE"))
                if width == widths[0]
                else (("topk", "TopK SAE"),)
            )
            for arch, label in archs:  # BatchTopK at the narrow width only: the budget is ~40 min
                trained = train_sae(
                    cached,
                    architecture=arch,
                    d_sae=width,
                    k=k,
                    training_tokens=args.sae_tokens,
                    model_name=name,
                )
                saes[label] = (
                    trained.sae,
                    trained.train_seconds + trained.training_tokens * per_token_forward,
                    trained.training_tokens,
                )
            seen = min(build_meta["tokens_scored"], cached.acts.shape[0])
            small_cache = CachedActivations(
                cached.acts[:seen], cached.token_ids[:seen], hook, cached.context_size, 0.0
            )
            small = train_sae(
                small_cache,
                architecture="topk",
                d_sae=width,
                k=k,
                training_tokens=seen,
                batch_size=min(2048, seen),
                model_name=name,
            )
            saes["TopK SAE, ITDA's tokens only"] = (
                small.sae,
                small.train_seconds + seen * per_token_forward,
                seen,
            )
            topk_sae, topk_s, topk_t = saes["TopK SAE"]
            saes["MP over TopK SAE decoder"] = (
                ITDA.from_atoms(topk_sae.W_dec.detach(), k, metadata=usage_metadata(itda)),
                topk_s,
                topk_t,
            )
            for label, (sae, seconds, tokens) in saes.items():
                do_probe = k == probe_l0 and width == widths[0]
                do_core = (
                    args.core
                    and do_probe
                    and name == args.models[0]
                    and label
                    in ("ITDA (MP)", "TopK SAE", "BatchTopK SAE", "random activations, MP")
                )
                res = evaluate_all(
                    sae, model, heldout, probe=probe if do_probe else None, core=do_core
                )
                ev = res["run_evals"]
                row = {
                    "model": name,
                    "hook": hook,
                    "width": width,
                    "L0": k,
                    "method": label,
                    "atoms": sae.cfg.d_sae,
                    "ce_loss_score": ev["ce_loss_score"],
                    "kl_div_score": ev["kl_div_score"],
                    "explained_variance": ev["explained_variance"],
                    "l0_measured": ev["l0"],
                    "wall_s": round(seconds, 2),
                    "tokens": tokens,
                }
                if "probing" in res:
                    row["probe"] = res["probing"]["mean"]
                    row["probe_tasks"] = res["probing"]["tasks"]
                if "saebench_core" in res:
                    row["saebench_core"] = res["saebench_core"]
                rows.append(row)
        print(f"    done L0={k}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """The comparisons the issue asks for, in words and numbers."""
    lines = []
    keyed = {(r["model"], r.get("width"), r["L0"], r["method"]): r for r in rows}
    for (model, width, k, method), r in sorted(
        keyed.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])
    ):
        if method != "ITDA (MP)":
            continue
        topk = keyed[(model, width, k, "TopK SAE")]
        rand = keyed[(model, width, k, "random activations, MP")]
        lines.append(
            f"{model} width {width} L0 {k}: ITDA - TopK CE score {r['ce_loss_score'] - topk['ce_loss_score']:+.3f}, "
            f"EV {r['explained_variance'] - topk['explained_variance']:+.3f}; ITDA - random activations CE "
            f"{r['ce_loss_score'] - rand['ce_loss_score']:+.3f}, EV {r['explained_variance'] - rand['explained_variance']:+.3f}; "
            f"wall-clock ITDA/TopK {r['wall_s'] / max(topk['wall_s'], 1e-9):.3f}, tokens ITDA/TopK "
            f"{r['tokens'] / max(topk['tokens'], 1):.3f} (ITDA {r['atoms']} atoms)"
        )
    return lines


def plots(rows: list[dict[str, Any]], out: Path) -> None:
    for model in sorted({r["model"] for r in rows}):
        for width in sorted(
            {
                r["width"]
                for r in rows
                if r["model"] == model and r["method"] != "raw activations (identity)"
            }
        ):
            sel = [r for r in rows if r["model"] == model and r["width"] == width and "hook" in r]
            line_plot(
                series_by(sel, "method", "L0", "ce_loss_score"),
                out / f"ce_vs_l0_{model}_w{width}.png",
                xlabel="L0",
                ylabel="CE-loss score (held-out)",
                title=f"{model}, width {width}",
                logx=True,
            )
        sel = [r for r in rows if r["model"] == model and r["wall_s"] > 0]
        line_plot(
            series_by(sel, "method", "wall_s", "ce_loss_score"),
            out / f"ce_vs_wallclock_{model}.png",
            xlabel="wall-clock to build / train (s, incl. model forward)",
            ylabel="CE-loss score (held-out)",
            title=model,
            logx=True,
        )


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/vs_sae")
    args = parser.parse_args()
    if args.quick:
        args.models, args.l0_fractions, args.widths = [FULL[0][0]], (0.0625, 0.125), (8,)
        args.train_windows, args.build_windows, args.heldout_windows, args.sae_tokens = (
            512,
            256,
            16,
            40_000,
        )
        args.probe_train, args.probe_test, args.core = 16, 16, True
    else:
        args.models, args.l0_fractions, args.widths = [m for m, _ in FULL], None, None
        args.train_windows, args.build_windows, args.heldout_windows, args.sae_tokens = (
            4096,
            2048,
            64,
            500_000,
        )
        args.probe_train, args.probe_test, args.core = 64, 64, True
    out = prepare(args)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    probe_cache: dict = {}
    for name, hook in FULL:
        if name in args.models:
            rows += run_model(name, hook, args, probe_cache)
    shown = [
        {
            **r,
            **{
                k: f"{r[k]:.3f}"
                for k in ("ce_loss_score", "kl_div_score", "explained_variance")
                if k in r
            },
            "L0 (measured)": f"{r.get('l0_measured', r['L0']):.1f}",
            "probe k=1/5/all": "/".join(f"{r['probe'][k]:.2f}" for k in ("1", "5", "all"))
            if "probe" in r
            else "",
        }
        for r in rows
    ]
    print(
        table(
            shown,
            [
                "model",
                "width",
                "L0",
                "method",
                "atoms",
                "ce_loss_score",
                "kl_div_score",
                "explained_variance",
                "L0 (measured)",
                "probe k=1/5/all",
                "wall_s",
                "tokens",
            ],
        )
    )
    summary = summarise(rows)
    print("\n" + "\n".join(summary))
    core = {r["method"]: r["saebench_core"] for r in rows if "saebench_core" in r}
    for method, metrics in core.items():
        picked = {
            k.split(".")[-1]: round(v, 3)
            for k, v in metrics.items()
            if k.split(".")[-1]
            in ("ce_loss_score", "kl_div_score", "explained_variance", "l0", "frac_alive")
        }
        print(f"SAEBench core, {method}: {picked}")
    plots(rows, out)
    (out / "vs_sae.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "summary": summary,
                "seconds": time.perf_counter() - t0,
                "settings": {k: v for k, v in vars(args).items() if k != "models"},
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {out / 'vs_sae.json'} and plots; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
