"""ITDA as the starting point of SAE training: how much training does a warm start save?

For each zoo size (at a middle layer) and each sae_lens training architecture (TopK, BatchTopK,
AbsTopK, matching pursuit, standard, JumpReLU; width 8x d_model, L0 budget k = 16, sae_lens's own
trainer on the cached activations of the training windows), one training run per initialisation:

* ``default``: sae_lens's own initialisation;
* ``random activations``: as many randomly drawn training activations as the ITDA has atoms,
  started by the same rule (``itda_lens.warmstart.AUTO_RULE``);
* ``ITDA``: a greedy ITDA (k = 16) sized to the atoms the rule fills (``target_atoms``, searched on
  all training activations; ``pairs`` needs half the width);
* ``ITDA refined``: the same with ``refine="energy"``;

and the ITDAs alone (no training). Along each run (sae_lens's checkpoints, one run per init, not
one per budget) the inference SAE is scored on held-out books: FVU on held-out activations at
every eighth of the run, CE-loss score (sae_lens ``run_evals``) at 0, 1/4, 1/2 and the end. The
speed-up is what each init needs to reach the default init's final FVU: training tokens
(interpolated between checkpoints) and wall-clock (ITDA build time included; the forward pass
that cached the activations is shared by all and not counted), as ratios default / init.

    python benchmarks/warm_start.py                                 # full run (see README)
    python benchmarks/warm_start.py --quick --out bench_out/warm_start_q
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import ITDA, build_itda_from_activations, zoo
from itda_lens.activations import CachedActivations, collect_activations
from itda_lens.analysis import fvu
from itda_lens.evals import evaluate
from itda_lens.plots import line_plot
from itda_lens.training import TRAIN_ARCHITECTURES, train_sae
from itda_lens.warmstart import AUTO_RULE, InitSource, init_rows, random_activations

MODELS = {"kjv-4l128-s0": "blocks.2.hook_resid_post", "kjv-6l160-s0": "blocks.3.hook_resid_post"}
K = 16
BATCH = 256
INITS = ("default", "random activations", "ITDA", "ITDA refined")
#: fractions of the run where the table reports FVU and CE (and the end), by column label
BUDGETS = {"0": 0.0, "1/4": 0.25, "1/2": 0.5}


def heldout_scores(sae: Any, acts: torch.Tensor) -> dict[str, float]:
    """Held-out FVU and mean L0 of any SAE (ITDAs included)."""
    with torch.no_grad():
        z = sae.encode(acts)
        return {"fvu": fvu(acts, sae.decode(z)), "l0": float((z != 0).sum(-1).float().mean())}


def build(cached: CachedActivations, name: str, n_atoms: int, refine: str) -> tuple[ITDA, float]:
    """A greedy ITDA over the cached activations, sized to ``n_atoms``; with its build seconds."""
    acts = cached.acts
    t0 = time.perf_counter()
    itda = build_itda_from_activations(
        [acts[s : s + 8192] for s in range(0, len(acts), 8192)],
        k=K,
        target_atoms=n_atoms,
        target_sample_tokens=len(acts),
        refine=refine,
        progress=False,
        metadata=cached.usage_metadata(name),
    )
    if itda.cfg.d_sae > n_atoms:  # the search lands within 2%; the rule's rows are fixed
        itda = itda.crop(n_atoms)
    return itda, time.perf_counter() - t0


def train_run(
    cached: CachedActivations,
    arch: str,
    width: int,
    tokens: int,
    checkpoints: int,
    init: ITDA | InitSource | None,
    evals: tuple[Any, torch.Tensor, torch.Tensor, str],
) -> list[dict[str, Any]]:
    """One training run; held-out FVU and L0 at every checkpoint, the CE-loss score at BUDGETS
    and the end, with the tokens and seconds trained so far (train_sae's clock: scoring excluded)."""
    model, held_acts, held_tokens, name = evals
    ce_at = {round(b * (checkpoints + 1)) for b in BUDGETS.values()}
    points: list[dict[str, Any]] = []

    def score(n: int, seconds: float, sae: Any, ce: bool) -> None:
        p = {"tokens": n, "seconds": seconds, **heldout_scores(sae, held_acts)}
        if ce:
            p["ce"] = evaluate(sae, model, held_tokens)["ce_loss_score"]
        points.append(p)

    trained = train_sae(
        cached,
        architecture=arch,  # type: ignore[arg-type]
        d_sae=width,
        k=K,
        training_tokens=tokens,
        batch_size=BATCH,
        model_name=name,
        init=init,
        checkpoints=checkpoints,
        on_checkpoint=lambda n, t, sae: score(n, t, sae, len(points) in ce_at),
    )
    score(trained.training_tokens, trained.train_seconds, trained.sae, True)
    return points


def reach(points: list[dict[str, Any]], target: float) -> tuple[float, float] | None:
    """Training tokens and seconds at which the held-out FVU first reaches ``target`` (linear
    between checkpoints), or None."""
    for i, p in enumerate(points):
        if p["fvu"] <= target:
            if i == 0:
                return 0.0, p["seconds"]
            q = points[i - 1]
            f = (q["fvu"] - target) / (q["fvu"] - p["fvu"])
            return (
                q["tokens"] + f * (p["tokens"] - q["tokens"]),
                q["seconds"] + f * (p["seconds"] - q["seconds"]),
            )
    return None


def run_model(
    name: str, hook: str, archs: tuple[str, ...], sizes: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = zoo.load_model(name)
    width = sizes["width"] * model.cfg.d_model
    windows, heldout, epochs, ckpts = (sizes[s] for s in ("windows", "heldout", "epochs", "ckpts"))
    cached = collect_activations(model, zoo.load_tokens("train", windows), hook)
    held_tokens = zoo.load_tokens("heldout", heldout)
    held_acts = collect_activations(model, held_tokens, hook).acts
    evals = (model, held_acts, held_tokens, name)
    tokens = epochs * cached.acts.shape[0]
    print(f"\n{name} {hook}: {cached.acts.shape[0]:,} activations, {tokens:,} training tokens")
    itdas: dict[tuple[int, str], tuple[ITDA, float]] = {}
    alone: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for arch in archs:
        rule = AUTO_RULE[arch]
        n_atoms = width // init_rows(rule, 1)
        for refine in ("none", "energy"):
            if (n_atoms, refine) not in itdas:
                itda, seconds = build(cached, name, n_atoms, refine)
                itdas[n_atoms, refine] = (itda, seconds)
                alone.append(
                    {
                        "model": name,
                        "init": "ITDA" if refine == "none" else "ITDA refined",
                        "atoms": itda.cfg.d_sae,
                        "build s": seconds,
                        **heldout_scores(itda, held_acts),
                        "ce": evaluate(itda, model, held_tokens)["ce_loss_score"],
                    }
                )
                print(f"  {alone[-1]}", flush=True)
        sources: dict[str, tuple[ITDA | InitSource | None, float]] = {
            "default": (None, 0.0),
            "random activations": (
                random_activations(
                    cached.acts, itdas[n_atoms, "none"][0].cfg.d_sae, hook_name=hook
                ),
                0.0,
            ),
            "ITDA": itdas[n_atoms, "none"],
            "ITDA refined": itdas[n_atoms, "energy"],
        }
        for init, (source, build_s) in sources.items():
            points = train_run(cached, arch, width, tokens, ckpts, source, evals)
            runs.append(
                {
                    "model": name,
                    "architecture": arch,
                    "init": init,
                    "rule": "-" if source is None else rule,
                    "atoms": 0 if source is None else _n_atoms(source),
                    "build s": build_s,
                    "points": points,
                }
            )
            print(
                f"  {arch} {init}: FVU "
                + " ".join(f"{p['fvu']:.4f}" for p in points)
                + f" ({points[-1]['seconds']:.0f} s)",
                flush=True,
            )
    return runs, alone


def _n_atoms(source: ITDA | InitSource) -> int:
    return source.cfg.d_sae if isinstance(source, ITDA) else source.n_atoms


def at_budget(points: list[dict[str, Any]], fraction: float, key: str) -> float:
    """The value at the checkpoint closest to ``fraction`` of the run."""
    total = points[-1]["tokens"]
    p = min((p for p in points if key in p), key=lambda p: abs(p["tokens"] - fraction * total))
    return p[key]


def speedups(runs: list[dict[str, Any]], alone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        base = next(
            b
            for b in runs
            if b["model"] == r["model"]
            and b["architecture"] == r["architecture"]
            and b["init"] == "default"
        )
        target = base["points"][-1]["fvu"]
        base_tokens, base_s = base["points"][-1]["tokens"], base["points"][-1]["seconds"]
        got = reach(r["points"], target)
        row = {
            "model": r["model"],
            "architecture": r["architecture"],
            "init": r["init"],
            "target FVU": f"{target:.4f}",
        }
        if got is None:
            row.update({"tokens to reach": "not reached", "seconds to reach": "-"})
        else:
            tokens, seconds = got
            seconds += r["build s"]
            row.update(
                {
                    "tokens to reach": f"{tokens:,.0f}",
                    "token speed-up": f"{base_tokens / tokens:.2f}x" if tokens else "inf",
                    "seconds to reach": f"{seconds:.1f}",
                    "wall-clock speed-up": f"{base_s / seconds:.2f}x",
                }
            )
        rows.append(row)
    for a in alone:
        for arch in sorted({r["architecture"] for r in runs if r["model"] == a["model"]}):
            target = next(
                r["points"][-1]["fvu"]
                for r in runs
                if r["model"] == a["model"] and r["architecture"] == arch and r["init"] == "default"
            )
            if a["fvu"] <= target:
                rows.append(
                    {
                        "model": a["model"],
                        "architecture": arch,
                        "init": f"{a['init']} alone ({a['atoms']} atoms)",
                        "target FVU": f"{target:.4f}",
                        "tokens to reach": "0",
                        "token speed-up": "inf",
                        "seconds to reach": f"{a['build s']:.1f}",
                    }
                )
    return rows


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/warm_start")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="one model only")
    args = parser.parse_args()
    out = prepare(args)
    t0 = time.perf_counter()
    if args.quick:
        models = {"kjv-4l128-s0": MODELS["kjv-4l128-s0"]}
        archs: tuple[str, ...] = ("topk", "matching_pursuit")
        sizes = {"width": 2, "windows": 32, "heldout": 4, "epochs": 2, "ckpts": 3}
    else:
        models = {args.model: MODELS[args.model]} if args.model else MODELS
        archs = TRAIN_ARCHITECTURES
        sizes = {"width": 8, "windows": 256, "heldout": 64, "epochs": 4, "ckpts": 7}
    runs: list[dict[str, Any]] = []
    alone: list[dict[str, Any]] = []
    for name, hook in models.items():
        r, a = run_model(name, hook, archs, sizes)
        runs += r
        alone += a
    shown = [
        {
            **{c: r[c] for c in ("model", "architecture", "init", "rule", "atoms")},
            "tokens": f"{r['points'][-1]['tokens']:,}",
            **{f"FVU @{b}": f"{at_budget(r['points'], f, 'fvu'):.4f}" for b, f in BUDGETS.items()},
            "FVU @end": f"{r['points'][-1]['fvu']:.4f}",
            **{f"CE @{b}": f"{at_budget(r['points'], f, 'ce'):.3f}" for b, f in BUDGETS.items()},
            "CE @end": f"{r['points'][-1]['ce']:.3f}",
            "L0 @end": f"{r['points'][-1]['l0']:.1f}",
        }
        for r in runs
    ] + [
        {
            "model": a["model"],
            "architecture": "-",
            "init": f"{a['init']} alone",
            "rule": "-",
            "atoms": a["atoms"],
            "tokens": "0",
            "FVU @end": f"{a['fvu']:.4f}",
            "CE @end": f"{a['ce']:.3f}",
            "L0 @end": f"{a['l0']:.1f}",
        }
        for a in alone
    ]
    cols = ["model", "architecture", "init", "rule", "atoms", "tokens"]
    cols += [f"FVU @{b}" for b in BUDGETS] + ["FVU @end"]
    cols += [f"CE @{b}" for b in BUDGETS] + ["CE @end", "L0 @end"]
    print(table(shown, cols))
    speed = speedups(runs, alone)
    speed_cols = [
        "model",
        "architecture",
        "init",
        "target FVU",
        "tokens to reach",
        "token speed-up",
        "seconds to reach",
        "wall-clock speed-up",
    ]
    print(table(speed, speed_cols))
    for name in models:
        for arch in archs:
            sub = [r for r in runs if r["model"] == name and r["architecture"] == arch]
            line_plot(
                {
                    r["init"]: ([p["tokens"] for p in r["points"]], [p["fvu"] for p in r["points"]])
                    for r in sub
                },
                out / f"fvu_vs_tokens_{name}_{arch}.png",
                xlabel="training tokens",
                ylabel="held-out FVU",
                title=f"{name}: {arch} SAE (k={K}) by initialisation",
            )
    record(
        "warm_start",
        args,
        {"budgets": table_spec(shown, cols), "speedup": table_spec(speed, speed_cols)},
        {"runs": runs, "itda_alone": alone, "sizes": sizes, "k": K},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
