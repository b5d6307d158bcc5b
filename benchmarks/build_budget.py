"""How many tokens does an ITDA build need? Quality against tokens read, next to TopK SAEs.

Under the exact sequential add rule (the default) the dictionary read from the first B tokens is
exactly the prefix of any longer build's atoms that arrived before token B, so a token budget
(``max_tokens``) is a prefix cut and the atom count grows with the tokens read without depending on
the batch size. On ``kjv-4l128-s0`` ``blocks.2.hook_resid_post``, per L0 (= ITDA's k):

* sae_lens TopK SAEs of 8x and 32x d_model width (500k activations; wall-clock = training + the
  model forward over their activations): the references;
* ITDA at cos_threshold 0.9, stopped at token budgets from 8k to 256k: atoms, quality, wall-clock;
* the same with ``patience_tokens`` (16k): where it stopped and why (``stop_reason``); a patience
  build is a prefix of the budget build too, so the stopping point of other patience values is read
  off the largest budget build's atom positions (checked against the measured build);
* ITDA sized to 8x d_model (``target_atoms``; the threshold is searched on the whole budget, so each
  dictionary converges at ~8x d_model over the tokens it read).

Each dictionary is scored on held-out text (sae_lens ``run_evals``: CE-loss score, explained
variance); ITDA wall-clock is measured around ``build_itda`` (model forward, threshold search,
dictionary work), as a fraction of each TopK SAE's.

    python benchmarks/build_budget.py                     # full run (see benchmarks/README.md)
    python benchmarks/build_budget.py --quick --out bench_out/build_budget_q
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import ITDA, build_itda, zoo
from itda_lens.activations import collect_activations
from itda_lens.evals import evaluate
from itda_lens.plots import line_plot
from itda_lens.training import train_sae

MODEL, HOOK = "kjv-4l128-s0", "blocks.2.hook_resid_post"
COS = 0.9
COS_METHOD = f"ITDA cos {COS}"


def kilo(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def atom_positions(itda: ITDA, context: int) -> list[int]:
    """Stream position (token index) of every atom, in insertion order."""
    labels = itda.atom_labels.long()
    return (labels[:, 0] * context + labels[:, 1]).tolist()


def patience_stop(positions: list[int], read: int, patience: int) -> tuple[int, int] | None:
    """(tokens read, atoms) at which a build with ``patience_tokens=patience`` stops, given the
    atom positions of a build over ``read`` tokens (None: it reads all of them). A builder stops
    after reading position ``last atom + patience``, so it stops before atom i iff the gap to the
    previous atom exceeds the patience."""
    prev = -1
    for i, pos in enumerate(positions):
        if pos - prev > patience:
            return prev + patience + 1, i
        prev = pos
    if read > prev + patience + 1:
        return prev + patience + 1, len(positions)
    return None


def longest_quiet_run(positions: list[int], read: int) -> int:
    """Longest run of consecutive tokens read without a new atom."""
    edges = [-1, *positions, read]
    return max(b - a - 1 for a, b in itertools.pairwise(edges))


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/build_budget")
    args = parser.parse_args()
    if args.quick:
        l0s, budgets, windows, heldout_n, sae_tokens = [8], [2048, 4096], 48, 8, 12_000
        patience, sized = 1024, 2
    else:
        l0s, budgets = [8, 16], [8192 * 2**i for i in range(6)]
        windows, heldout_n, sae_tokens, patience, sized = 4096, 64, 500_000, 16_384, 8
    sized_method = f"ITDA sized to {sized}x"
    grid = sorted({patience // 4, patience // 2, patience, 2 * patience, 4 * patience})
    out = prepare(args)
    t0 = time.perf_counter()
    model = zoo.load_model(MODEL)
    d = model.cfg.d_model
    train = zoo.load_tokens("train", windows)
    heldout = zoo.load_tokens("heldout", heldout_n)
    context = train.shape[1]
    cached = collect_activations(model, train, HOOK)
    per_token_forward = cached.forward_seconds / cached.acts.shape[0]
    rows: list[dict[str, Any]] = []
    patience_rows: list[dict[str, Any]] = []
    growth: dict[str, list[list[int]]] = {}

    def score(sae: Any) -> dict[str, float]:
        ev = evaluate(sae, model, heldout)
        return {
            "ce_loss_score": ev["ce_loss_score"],
            "explained_variance": ev["explained_variance"],
        }

    refs: dict[int, dict[int, float]] = {}  # L0 -> {width multiple: TopK SAE wall-clock}

    def add_row(row: dict[str, Any]) -> None:
        rows.append(row)
        brief = {
            key: v for key, v in row.items() if key not in ("L0", "method", "budget", "record")
        }
        print(f"  L0={row['L0']} {row['method']} {row['budget']}: {brief}", flush=True)

    def build(k: int, budget: int, **kw: Any) -> tuple[ITDA, float]:
        start = time.perf_counter()
        itda = build_itda(
            model, train, HOOK, k=k, max_tokens=budget, progress=False, model_name=MODEL, **kw
        )[HOOK]
        return itda, time.perf_counter() - start

    def itda_row(k: int, method: str, budget: int, itda: ITDA, seconds: float) -> dict[str, Any]:
        record = itda.require_build_record()
        read = record.tokens_seen
        stop = record.stop_reason or ("token budget" if read >= budget else "end of data")
        return {
            "L0": k,
            "method": method,
            "budget": kilo(budget),
            "tokens": read,
            "atoms": itda.cfg.d_sae,
            "threshold": record.cos_threshold,
            "stop": stop,
            **score(itda),
            "wall_s": seconds,
            "record": {
                key: v for key, v in record.to_dict().items() if key != "excluded_token_ids"
            },
        }

    # warm-up: compile the pursuit kernel outside the timings
    build(l0s[0], 2048, cos_threshold=COS)
    for k in l0s:
        ref = refs.setdefault(k, {})
        for mult in (8, 32):
            sae = train_sae(
                cached,
                architecture="topk",
                d_sae=mult * d,
                k=k,
                training_tokens=sae_tokens,
                model_name=MODEL,
            )
            ref[mult] = sae.train_seconds + sae.training_tokens * per_token_forward
            row = {
                "L0": k,
                "method": f"TopK SAE {mult}x",
                "budget": "",
                "tokens": sae.training_tokens,
                "atoms": sae.sae.cfg.d_sae,
                "threshold": "",
                "stop": "",
                **score(sae.sae),
                "wall_s": ref[mult],
            }
            add_row(row)
        last: ITDA | None = None
        for budget in budgets:
            itda, seconds = build(k, budget, cos_threshold=COS)
            if last is not None:  # the exact rule: a shorter budget's dictionary is a prefix
                n = last.cfg.d_sae
                prefix = torch.equal(itda.atom_labels[:n], last.atom_labels)
                rows[-1]["prefix of the next budget"] = prefix
            add_row(itda_row(k, COS_METHOD, budget, itda, seconds))
            last = itda
        assert last is not None
        read = last.require_build_record().tokens_seen
        positions = atom_positions(last, context)
        growth[f"L0={k}"] = last.require_build_record().growth
        itda, seconds = build(k, budgets[-1], cos_threshold=COS, patience_tokens=patience)
        measured = itda_row(
            k, f"{COS_METHOD}, patience {kilo(patience)}", budgets[-1], itda, seconds
        )
        add_row(measured)
        quiet = longest_quiet_run(positions, read)
        for p in grid:
            stop = patience_stop(positions, read, p)
            prow: dict[str, Any] = {
                "L0": k,
                "patience": kilo(p),
                "stops after (tokens)": f"{stop[0]:,}" if stop else f"never within {kilo(read)}",
                "atoms": stop[1] if stop else len(positions),
                "source": f"atom positions of the {kilo(read)}-token build",
                "longest atom-free run": f"{quiet:,}",
            }
            if p == patience:
                predicted = (stop[0], stop[1]) if stop else (read, len(positions))
                got = (measured["tokens"], measured["atoms"])
                prow["source"] = (
                    f"measured build, stop_reason {measured['stop']} "
                    f"({'= prediction' if got == predicted else f'prediction was {predicted}'})"
                )
                prow["prediction matches"] = got == predicted
            patience_rows.append(prow)
        half = read // 2
        late = sum(pos >= half for pos in positions)
        print(
            f"  L0={k}: longest atom-free run {quiet:,} tokens; {late} atoms in the second half "
            f"of {read:,} tokens ({1024 * late / (read - half):.1f} per 1k tokens)",
            flush=True,
        )
        for budget in budgets:
            try:
                itda, seconds = build(
                    k, budget, target_atoms=sized * d, target_sample_tokens=budget
                )
            except ValueError as err:  # not reachable from this many tokens: say so
                row = {
                    "L0": k,
                    "method": sized_method,
                    "budget": kilo(budget),
                    "stop": f"not reachable: {err}",
                }
                rows.append(row)
                print(f"  L0={k} {sized_method} {kilo(budget)}: {err}", flush=True)
                continue
            row = itda_row(k, sized_method, budget, itda, seconds)
            # the sample is the whole budget, so the build must read exactly it and end with the
            # atom count the search found on it (else the build streamed other tokens)
            search = row["record"]["search"]
            row["built on its sample"] = (
                row["tokens"] == min(budget, train.numel())
                and row["atoms"] == search["atoms_on_sample"]
            )
            add_row(row)

    for r in rows:
        if "wall_s" in r:
            for mult, seconds in refs[r["L0"]].items():
                r[f"wall / TopK {mult}x"] = r["wall_s"] / seconds

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) and not isinstance(v, bool) else ""

    shown = [
        {
            **r,
            "tokens read": fmt(r.get("tokens"), ","),
            "threshold": fmt(r.get("threshold"), ".4f"),
            "ce_loss_score": fmt(r.get("ce_loss_score"), ".4f"),
            "explained_variance": fmt(r.get("explained_variance"), ".3f"),
            "wall_s": fmt(r.get("wall_s"), ".1f"),
            "wall / TopK 8x": fmt(r.get("wall / TopK 8x"), ".3f"),
            "wall / TopK 32x": fmt(r.get("wall / TopK 32x"), ".3f"),
        }
        for r in rows
    ]
    cols = [
        "L0",
        "method",
        "budget",
        "tokens read",
        "atoms",
        "threshold",
        "stop",
        "ce_loss_score",
        "explained_variance",
        "wall_s",
        "wall / TopK 8x",
        "wall / TopK 32x",
    ]
    pcols = ["L0", "patience", "stops after (tokens)", "atoms", "source", "longest atom-free run"]
    print(table(shown, cols))
    print(table(patience_rows, pcols))
    prefixes = [r["prefix of the next budget"] for r in rows if "prefix of the next budget" in r]
    print(f"every budget's dictionary is a prefix of the next one's: {all(prefixes)}")
    on_sample = [r["built on its sample"] for r in rows if "built on its sample" in r]
    print(f"every sized build read the tokens it was sized on: {all(on_sample)}")
    if not all(on_sample):
        print(
            "WARNING: a target_atoms build streamed tokens other than its threshold-search sample "
            "(its rows do not measure a dictionary sized on its budget)"
        )
    series: dict[str, tuple[list[Any], list[Any]]] = {}
    for k in l0s:
        for method in (COS_METHOD, sized_method):
            sub = [r for r in rows if r["L0"] == k and r["method"] == method and "tokens" in r]
            series[f"{method}, L0={k}"] = (
                [r["tokens"] for r in sub],
                [r["ce_loss_score"] for r in sub],
            )
        for r in rows:
            if r["L0"] == k and r["method"].startswith("TopK"):
                series[f"{r['method']} (500k acts), L0={k}"] = (
                    [budgets[0], budgets[-1]],
                    [r["ce_loss_score"]] * 2,
                )
    line_plot(
        series,
        out / "ce_vs_tokens.png",
        xlabel="tokens read by the build",
        ylabel="CE-loss score (held-out)",
        title=f"{MODEL} {HOOK}: ITDA quality against build budget",
        logx=True,
        markers=True,
    )
    line_plot(
        {
            f"{COS_METHOD}, {label}": ([p[0] for p in pts], [p[1] for p in pts])
            for label, pts in growth.items()
        },
        out / "atoms_vs_tokens.png",
        xlabel="tokens read",
        ylabel="atoms",
        title=f"{MODEL} {HOOK}: dictionary growth (exact rule)",
        logx=True,
        markers=False,
    )
    record(
        "build_budget",
        args,
        {"budgets": table_spec(shown, cols), "patience": table_spec(patience_rows, pcols)},
        {
            "model": MODEL,
            "hook": HOOK,
            "rows": rows,
            "patience": patience_rows,
            "growth": growth,
            "prefixes": all(prefixes),
            "sized_builds_read_their_sample": all(on_sample),
            "windows": windows,
            "heldout_windows": heldout_n,
        },
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
