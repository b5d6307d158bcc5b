"""ITDA against trained SAEs and honest controls, side by side: quality, time and data.

For each model (the default zoo model and a larger one, at a middle layer's resid_post), each L0
(about 2%, 6%, 12% and 25% of d_model) and each width (8x and 32x d_model):

* ITDA built by our builder with the exact greedy rule at k = L0, sized to the width
  (``target_atoms``: the threshold whose converged dictionary over the 512 build windows, 65k
  tokens, has that many atoms, searched on all of them), and at the 8x width the same refined
  (``refine="energy"``: built 3x wider, pruned back by coefficient energy);
* SAEs trained with sae_lens's own trainer (``SAETrainer``) on activations of the same model, hook
  and training windows (budget: 500k activations): TopK and AbsTopK (signed top-k, the SplInterp
  authors' activation) at both widths, BatchTopK and the ``matching_pursuit`` SAE (a trained
  dictionary with MP encoding: the method closest to ITDA; max_iterations = L0, no residual stop) at
  the 8x width (at 32x the MP SAE alone would take hours on 2 CPU cores), and the TopK SAE trained on
  only the activations the ITDA read;
* controls with the same encoder (signed MP, k = L0) and the same size as the ITDA: randomly sampled
  training activations (ITDA without the greedy selection), random Gaussian atoms, the trained TopK
  SAE's decoder rows, and OMP instead of MP over the ITDA's atoms.

Each is scored with sae_lens ``run_evals`` on held-out windows (CE-loss score, KL score, explained
variance, L0); k-sparse probing (SAEBench's procedure, zoo-corpus tasks) at one L0 and the 8x width;
SAEBench ``core`` for one of each kind. Wall-clock counts the model forward for the tokens each
method needs; tokens are activations read. Writes tables (JSON), and two plots per model.

    python benchmarks/vs_sae.py --out bench_out/vs_sae            # full run (hours on 2 cores)
    python benchmarks/vs_sae.py --model kjv-4l128-s0 --l0-fractions 0.0625 0.125   # a part
    python benchmarks/vs_sae.py --quick --out bench_out/vs_sae_q  # reduced run (a few minutes)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, prepare, record, series_by, table, table_spec

from itda_lens import ITDA, build_itda, zoo
from itda_lens.activations import CachedActivations, collect_activations, usage_metadata
from itda_lens.evals import evaluate_all
from itda_lens.plots import line_plot
from itda_lens.probing import probe_data
from itda_lens.training import train_sae

FULL = [("kjv-4l128-s0", "blocks.2.hook_resid_post"), ("kjv-6l160-s0", "blocks.3.hook_resid_post")]
L0_FRACTIONS = (0.025, 0.0625, 0.125, 0.25)
WIDTHS = (8, 32)
#: sae_lens trainers, label -> (architecture, trained at every width or only the narrowest)
SAE_ARCHS = {
    "TopK SAE": ("topk", True),
    "AbsTopK SAE": ("abstopk", True),
    "BatchTopK SAE": ("batchtopk", False),
    "MP SAE": ("matching_pursuit", False),
}


def controls(itda: ITDA, cached: CachedActivations, k: int, seed: int) -> dict[str, ITDA]:
    """Same encoder and size as ``itda``, different atoms."""
    n, d = itda.cfg.d_sae, itda.cfg.d_in
    meta = usage_metadata(itda)
    # the Gaussian atoms continue the seed's stream after the permutation the control drew
    g = torch.Generator().manual_seed(seed)
    torch.randperm(cached.acts.shape[0], generator=g)
    return {
        "ITDA atoms, OMP": ITDA.from_atoms(
            itda.W_dec, k, encoder="omp", labels=itda.atom_labels, metadata=meta
        ),
        "random activations, MP": ITDA.from_random_activations(
            cached.acts, n, k, seed=seed, metadata=meta
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
    build_tokens = train[: args.build_windows]
    for k in l0s:
        for width in widths:
            saes: dict[str, tuple[Any, float, int]] = {}
            variants = [("ITDA (MP)", "none")]
            if width == widths[0]:  # refining at 32x builds ~12k-atom dictionaries: hours on CPU
                variants.append(("ITDA refined (MP)", "energy"))
            for label, refine in variants:
                t0 = time.perf_counter()
                built = build_itda(
                    model,
                    build_tokens,
                    hook,
                    k=k,
                    target_atoms=width,
                    target_sample_tokens=build_tokens.numel(),
                    refine=refine,
                    progress=False,
                    model_name=name,
                    dataset_path="kjv:train",
                )[hook]
                record = built.require_build_record()
                # wall-clock = the forward over the build windows + everything the build did
                seconds = time.perf_counter() - t0 + per_token_forward * build_tokens.numel()
                saes[label] = (built, seconds, record.tokens_seen)
                print(
                    f"  L0={k} width={width}: {label} {built.cfg.d_sae} atoms "
                    f"(threshold {record.cos_threshold:.4f}) in {time.perf_counter() - t0:.1f}s",
                    flush=True,
                )
            itda, _, itda_tokens = saes["ITDA (MP)"]
            for label, sae in controls(itda, cached, k, seed=k * 7919 + width).items():
                saes[label] = (sae, 0.0, 0)
            for label, (arch, every_width) in SAE_ARCHS.items():
                if not every_width and width != widths[0]:
                    continue
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
            seen = min(itda_tokens, cached.acts.shape[0])
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
                    in (
                        "ITDA (MP)",
                        "ITDA refined (MP)",
                        "TopK SAE",
                        "BatchTopK SAE",
                        "AbsTopK SAE",
                        "MP SAE",
                        "random activations, MP",
                    )
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
        ref = keyed.get((model, width, k, "ITDA refined (MP)"))
        lines.append(
            f"{model} width {width} L0 {k}: ITDA - TopK CE score {r['ce_loss_score'] - topk['ce_loss_score']:+.3f}, "
            f"EV {r['explained_variance'] - topk['explained_variance']:+.3f}; ITDA - random activations CE "
            f"{r['ce_loss_score'] - rand['ce_loss_score']:+.3f}, EV {r['explained_variance'] - rand['explained_variance']:+.3f}; "
            + (
                f"refined - random CE {ref['ce_loss_score'] - rand['ce_loss_score']:+.3f}, EV "
                f"{ref['explained_variance'] - rand['explained_variance']:+.3f}; "
                if ref
                else ""
            )
            + f"wall-clock ITDA/TopK {r['wall_s'] / max(topk['wall_s'], 1e-9):.3f}, tokens ITDA/TopK "
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


PIVOT = [
    ("ITDA", "ITDA (MP)"),
    ("ITDA refined", "ITDA refined (MP)"),
    ("random acts", "random activations, MP"),
    ("TopK", "TopK SAE"),
    ("AbsTopK", "AbsTopK SAE"),
    ("BatchTopK", "BatchTopK SAE"),
    ("MP SAE", "MP SAE"),
    ("TopK on ITDA's tokens", "TopK SAE, ITDA's tokens only"),
    ("MP/TopK dec", "MP over TopK SAE decoder"),
    ("OMP/ITDA", "ITDA atoms, OMP"),
    ("Gaussian", "Gaussian atoms, MP"),
]


def pivot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, width, L0); a cell per method: CE-loss score / explained variance."""
    keyed = {(r["model"], r.get("width"), r["L0"], r["method"]): r for r in rows if "hook" in r}
    out = []
    for model, width, k in dict.fromkeys((m, w, k) for m, w, k, _ in keyed):
        cell = {
            col: f"{r['ce_loss_score']:.3f} / {r['explained_variance']:.2f}"
            for col, method in PIVOT
            if (r := keyed.get((model, width, k, method)))
        }
        itda, topk = keyed[(model, width, k, "ITDA (MP)")], keyed[(model, width, k, "TopK SAE")]
        mp = keyed.get((model, width, k, "MP SAE"))
        out.append(
            {
                "model": model,
                "width": width,
                "L0": k,
                "ITDA atoms": itda["atoms"],
                **cell,
                "ITDA s / TopK s / MP SAE s": f"{itda['wall_s']:.1f} / {topk['wall_s']:.1f}"
                + (f" / {mp['wall_s']:.1f}" if mp else ""),
                "ITDA tokens": f"{itda['tokens']:,}",
            }
        )
    return out


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/vs_sae")
    parser.add_argument("--model", choices=[m for m, _ in FULL], help="one model only")
    parser.add_argument(
        "--l0-fractions",
        type=float,
        nargs="+",
        default=None,
        help=f"L0s as fractions of d_model (default {' '.join(map(str, L0_FRACTIONS))})",
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.l0_fractions, args.widths = [FULL[0][0]], (0.125,), (8,)
        args.train_windows, args.build_windows, args.heldout_windows, args.sae_tokens = (
            256,
            64,
            16,
            16_384,
        )
        args.probe_train, args.probe_test, args.core = 16, 16, True
    else:
        args.models = [args.model] if args.model else [m for m, _ in FULL]
        args.widths = None
        args.train_windows, args.build_windows, args.heldout_windows, args.sae_tokens = (
            4096,
            512,
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
    main_rows = pivot(rows)
    main_cols = (
        ["model", "width", "L0", "ITDA atoms"]
        + [c for c, _ in PIVOT]
        + [
            "ITDA s / TopK s / MP SAE s",
            "ITDA tokens",
        ]
    )
    print(table(main_rows, main_cols))
    probe_rows = [
        {
            "model": r["model"],
            "method": r["method"],
            "L0": r["L0"],
            "width": r.get("width", ""),
            "probe k=1 / 5 / all": " / ".join(f"{r['probe'][k]:.2f}" for k in ("1", "5", "all")),
        }
        for r in rows
        if "probe" in r
    ]
    probe_cols = ["model", "method", "L0", "width", "probe k=1 / 5 / all"]
    print("\n" + table(probe_rows, probe_cols))
    core_rows = []
    for r in rows:
        if "saebench_core" not in r:
            continue
        m = {k.split(".")[-1]: v for k, v in r["saebench_core"].items()}
        core_rows.append(
            {
                "model": r["model"],
                "method": r["method"],
                "width": r["width"],
                "L0 (nominal)": r["L0"],
                **{
                    key: f"{m[key]:.3f}"
                    for key in ("ce_loss_score", "kl_div_score", "explained_variance", "l0")
                    if key in m
                },
            }
        )
    core_cols = [
        "model",
        "method",
        "width",
        "L0 (nominal)",
        "ce_loss_score",
        "kl_div_score",
        "explained_variance",
        "l0",
    ]
    print("\n" + table(core_rows, core_cols))
    summary = summarise(rows)
    print("\n" + "\n".join(summary))
    plots(rows, out)
    record(
        "vs_sae",
        args,
        {
            "main": table_spec(main_rows, main_cols),
            "probing": table_spec(probe_rows, probe_cols),
            "core": table_spec(core_rows, core_cols),
        },
        {
            "rows": rows,
            "summary": summary,
            "settings": {k: v for k, v in vars(args).items() if k != "models"},
        },
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
