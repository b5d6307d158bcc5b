"""How many tokens does an ITDA build need? Quality against tokens read, next to TopK SAEs.

``vs_sae.py`` builds one dictionary capped at 32 x d_model atoms and crops it to each width, and
found that at moderate L0 (cos_threshold 0.9) atoms keep trickling in, so the no-new-atom patience
rule never fires and the build reads every token allowed. Here, per L0:

* a build capped at the narrow width (8 x d_model) itself, which stops as soon as it is full;
* the 32 x d_model-capped build stopped at a range of token budgets (``max_tokens``; the greedy
  build is sequential, so each is a prefix of the next).

Each dictionary is scored on held-out text; its measured wall-clock (model forward + dictionary
work) is given as a fraction of a sae_lens TopK SAE's of the same width (500k activations,
training + forward).

    python benchmarks/build_budget.py --out bench_out/build_budget          # ~8 min on 2 cores
    python benchmarks/build_budget.py --quick --out bench_out/build_budget_q
"""

from __future__ import annotations

import json
import time
from typing import Any

from _common import bench_parser, prepare, table

from itda_lens import build_itda, zoo
from itda_lens.evals import evaluate
from itda_lens.plots import line_plot
from itda_lens.sae_training import collect_activations, train_sae

MODEL, HOOK = "kjv-4l128-s0", "blocks.2.hook_resid_post"


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/build_budget")
    args = parser.parse_args()
    if args.quick:
        l0s, budgets, windows, heldout_n, sae_tokens = [8], [2048, 8192], 96, 8, 20_000
    else:
        l0s, budgets = [8, 16], [8192, 16384, 32768, 65536, 131072, 262144]
        windows, heldout_n, sae_tokens = 4096, 64, 500_000
    out = prepare(args)
    t0 = time.perf_counter()
    model = zoo.load_model(MODEL)
    d = model.cfg.d_model
    train = zoo.load_tokens("train", windows)
    heldout = zoo.load_tokens("heldout", heldout_n)
    cached = collect_activations(model, train, HOOK)
    per_token_forward = cached.forward_seconds / cached.acts.shape[0]
    rows: list[dict[str, Any]] = []

    def record(k: int, method: str, sae: Any, tokens: int, seconds: float, ref: float) -> None:
        ev = evaluate(sae, model, heldout)
        rows.append(
            {
                "L0": k,
                "method": method,
                "tokens": tokens,
                "atoms": sae.cfg.d_sae,
                "ce_loss_score": ev["ce_loss_score"],
                "explained_variance": ev["explained_variance"],
                "wall_s": seconds,
                "wall / TopK": seconds / ref,
            }
        )
        print(f"  L0={k} {method}: {rows[-1]}", flush=True)

    def build(k: int, max_atoms: int, budget: int | None) -> tuple[Any, int, float]:
        itda = build_itda(
            model,
            train,
            HOOK,
            k=k,
            cos_threshold=0.9,
            max_atoms=max_atoms,
            batch_size=8,
            max_tokens=budget,
            progress=False,
            model_name=MODEL,
        )
        meta = itda.cfg.metadata.itda_builder
        return itda, meta["tokens_seen"], meta["forward_seconds"] + meta["dictionary_seconds"]

    build(l0s[0], 8 * d, 2048)  # warm-up: compile the pursuit kernel outside the timings
    for k in l0s:
        ref = {}
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
            record(k, f"TopK SAE {mult}x", sae.sae, sae.training_tokens, ref[mult], ref[mult])
        itda, tokens, seconds = build(k, 8 * d, None)
        record(k, "ITDA 8x (stops when full)", itda, tokens, seconds, ref[8])
        for budget in budgets:
            itda, tokens, seconds = build(k, 32 * d, budget)
            record(k, f"ITDA <=32x, {budget // 1024}k-token budget", itda, tokens, seconds, ref[32])
    shown = [
        {
            **r,
            "ce_loss_score": f"{r['ce_loss_score']:.4f}",
            "explained_variance": f"{r['explained_variance']:.3f}",
            "wall_s": f"{r['wall_s']:.1f}",
            "wall / TopK": f"{r['wall / TopK']:.3f}",
            "tokens": f"{r['tokens']:,}",
        }
        for r in rows
    ]
    print(
        table(
            shown,
            [
                "L0",
                "method",
                "tokens",
                "atoms",
                "ce_loss_score",
                "explained_variance",
                "wall_s",
                "wall / TopK",
            ],
        )
    )
    line_plot(
        {
            f"ITDA <=32x, L0={k}": (
                [r["tokens"] for r in rows if r["L0"] == k and "budget" in r["method"]],
                [r["ce_loss_score"] for r in rows if r["L0"] == k and "budget" in r["method"]],
            )
            for k in l0s
        },
        out / "ce_vs_tokens.png",
        xlabel="tokens read by the build",
        ylabel="CE-loss score (held-out)",
        title=f"{MODEL} {HOOK}: ITDA quality against build budget",
        logx=True,
    )
    seconds = time.perf_counter() - t0
    (out / "build_budget.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2))
    print(f"\nwrote {out / 'build_budget.json'} and ce_vs_tokens.png; total {seconds:.0f}s")


if __name__ == "__main__":
    main()
