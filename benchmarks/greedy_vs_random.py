"""Does ITDA's greedy selection beat randomly sampled activations? Converged dictionaries by width.

For each zoo size (at a middle layer), k in {4, 16} and widths from 1x to 32x d_model: the exact
greedy dictionary over the training stream whose threshold is searched so that it converges at
that width (``target_atoms``), the same refined (built 3x wider, pruned back by coefficient
energy), and as many randomly sampled training activations (5 draws: mean and spread = max - min),
all encoded with the same signed MP at k steps; held-out FVU (fraction of variance unexplained) on
activations of the held-out books. At the largest k the greedy build is repeated on the windows in
shuffled order to check that what it measures is not the stream order.

    python benchmarks/greedy_vs_random.py --model kjv-4l128-s0   # one model (results file per model)
    python benchmarks/greedy_vs_random.py                     # both (hours on 2 cores)
    python benchmarks/greedy_vs_random.py --quick --out bench_out/greedy_vs_random_q
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import ITDA, build_itda_from_activations, zoo
from itda_lens.activations import collect_activations
from itda_lens.analysis import fvu
from itda_lens.plots import line_plot

MODELS = {"kjv-4l128-s0": "blocks.2.hook_resid_post", "kjv-6l160-s0": "blocks.3.hook_resid_post"}
DRAWS = 5
SEARCH_TOL = 0.02  # the random control always takes the greedy dictionary's exact count


def mp_fvu(itda: ITDA, x: torch.Tensor) -> float:
    with torch.no_grad():
        return fvu(x, itda.decode_sparse(itda.encode_sparse(x)))


def greedy(acts: torch.Tensor, k: int, n: int, refine: str = "none") -> ITDA:
    return build_itda_from_activations(
        [acts[s : s + 8192] for s in range(0, len(acts), 8192)],
        k=k,
        target_atoms=n,
        refine=refine,
        target_tolerance=SEARCH_TOL,
        target_sample_tokens=len(acts),  # search on the whole stream: converged at the width
        progress=False,
    )


def run_model(
    name: str, hook: str, ks: tuple[int, ...], mults: tuple[float, ...], windows: int, heldout: int
) -> list[dict[str, Any]]:
    model = zoo.load_model(name)
    d = model.cfg.d_model
    tokens = zoo.load_tokens("train", windows)
    train = collect_activations(model, tokens, hook)
    held = collect_activations(model, zoo.load_tokens("heldout", heldout), hook).acts
    # the same activations, the windows in another order
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(1))
    shuffled = collect_activations(model, tokens[order], hook).acts
    rows = []
    for k in ks:
        for mult in mults:
            n = int(mult * d)
            t0 = time.perf_counter()
            g = greedy(train.acts, k, n)
            t_greedy = time.perf_counter() - t0
            t0 = time.perf_counter()
            refined = greedy(train.acts, k, n, refine="energy")
            t_refined = time.perf_counter() - t0
            # the order check costs a third of a row: run it at the largest k only
            other = greedy(shuffled, k, n) if k == max(ks) else None
            m = g.cfg.d_sae  # the random control takes exactly as many activations
            rand = []
            for seed in range(DRAWS):
                control = ITDA.from_random_activations(train.acts, m, k, seed=seed)
                rand.append(mp_fvu(control, held))
            r = {
                "model": name,
                "k": k,
                "width": f"{mult:g}x",
                "target": n,
                "greedy atoms": m,
                "threshold": g.require_build_record().cos_threshold,
                "greedy FVU": mp_fvu(g, held),
                "refined FVU": mp_fvu(refined, held),
                "refined atoms": refined.cfg.d_sae,
                "random FVU": sum(rand) / DRAWS,
                "random spread": max(rand) - min(rand),
                "random draws": rand,
                "shuffled-order greedy FVU": mp_fvu(other, held) if other else None,
                "shuffled-order atoms": other.cfg.d_sae if other else None,
                "greedy s": t_greedy,
                "refined s": t_refined,
            }
            r["greedy / random"] = r["greedy FVU"] / r["random FVU"]
            r["refined / random"] = r["refined FVU"] / r["random FVU"]
            rows.append(r)
            print({key: v for key, v in r.items() if key != "random draws"}, flush=True)
    return rows


def verdict(r: dict[str, Any], col: str) -> str:
    """'better' / 'worse' by more than the random draws' spread, else 'within spread'."""
    gap = r["random FVU"] - r[col]
    if abs(gap) <= r["random spread"]:
        return "within spread"
    return "better" if gap > 0 else "worse"


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/greedy_vs_random")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="one model only")
    parser.add_argument(
        "--max-width", type=float, default=32.0, help="largest width (x d_model) of a full run"
    )
    args = parser.parse_args()
    out = prepare(args)
    t0 = time.perf_counter()
    if args.quick:
        ks, mults, windows, heldout = (16,), (1.0, 2.0), 64, 8
        models = {"kjv-4l128-s0": MODELS["kjv-4l128-s0"]}
    else:
        ks, windows, heldout = (4, 16), 1024, 64
        mults = tuple(m for m in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0) if m <= args.max_width)
        models = {args.model: MODELS[args.model]} if args.model else MODELS
    rows = [
        r
        for name, hook in models.items()
        for r in run_model(name, hook, ks, mults, windows, heldout)
    ]
    shown = [
        {
            **r,
            **{
                c: "—" if r[c] is None else f"{r[c]:.4f}"
                for c in (
                    "greedy FVU",
                    "refined FVU",
                    "random FVU",
                    "random spread",
                    "shuffled-order greedy FVU",
                )
            },
            **{c: f"{r[c]:.3f}" for c in ("greedy / random", "refined / random", "threshold")},
            "greedy vs random": verdict(r, "greedy FVU"),
            "refined vs random": verdict(r, "refined FVU"),
        }
        for r in rows
    ]
    cols = [
        "model",
        "k",
        "width",
        "greedy atoms",
        "threshold",
        "greedy FVU",
        "refined FVU",
        "random FVU",
        "random spread",
        "greedy / random",
        "refined / random",
        "greedy vs random",
        "refined vs random",
        "shuffled-order greedy FVU",
    ]
    print(table(shown, cols))
    for name in models:
        for k in ks:
            sub = [r for r in rows if r["model"] == name and r["k"] == k]
            line_plot(
                {
                    label: ([r["greedy atoms"] for r in sub], [r[col] for r in sub])
                    for label, col in (
                        ("greedy", "greedy FVU"),
                        ("refined greedy", "refined FVU"),
                        ("random activations", "random FVU"),
                    )
                },
                out / f"fvu_vs_atoms_{name}_k{k}.png",
                xlabel="atoms",
                ylabel="held-out FVU",
                title=f"{name}: greedy ITDA vs random activations, k={k}",
                logx=True,
            )
    record(
        f"greedy_vs_random_{args.model}" if args.model else "greedy_vs_random",
        args,
        {"main": table_spec(shown, cols)},
        {"rows": rows, "draws": DRAWS, "windows": windows},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
