"""Model diffing: do ITDA's per-token scores find what a fine-tune changed? Checked on changes whose
location is known, side by side with three baselines over the same tokens.

**Planted** (``kjv-4l128-s0`` -> ``kjv-4l128-s0-planted``, fine-tuned on text where the trigger
"unicorn" is always followed by "with golden wings"): the scored tokens are the held-out windows
that contain an insertion; positives are the trigger and phrase tokens (``zoo.load_token_marks``),
every other non-special token is a negative. Per layer (``blocks.L.hook_resid_post``) and score:
AUROC and precision at 50 (share of positives among the 50 highest-scoring tokens).

Scores (see ``itda_lens.diffing``):

* ITDA ``base_gap`` / ``ft_gap`` (the report's two directions) and the raw ``base_on_ft`` /
  ``ft_on_base``, from dictionaries of both models (``DIFF_CONFIG``: k = 20, cos 0.95) built over
  training windows, never the scored tokens; built on the plain text (what a user without the
  fine-tuning data has) and on the fine-tuning text, and with another threshold and window order
  (settings that should not matter much);
* ``|h_ft - h_base|``: the L2 norm of the activation difference at the hook;
* output KL: KL(p_ft || p_base) of the next-token distributions (one value per token: the same in
  every layer column);
* TopK SAE (sae_lens trainer, width 8 x d_model, k = 20, 4 epochs) trained on the base's
  activations of the same plain-text windows: relative reconstruction error of the fine-tune's
  activation, raw and minus the error on the base's own (the same gap as ITDA's).

The acceptance run ``itda-lens diff kjv-4l128-s0 kjv-4l128-s0-planted`` (every default) is timed
in-process too, with how many of its top fine-tune-side contexts are planted tokens.

Wall-clock per method covers all layers: ITDA both builds + scoring; SAE caching + training (one
per layer) + scoring; the two baselines their forward passes.

**Domain shift** (``kjv-4l128-s0`` -> ``kjv-4l128-s0-epistles``, continued training on the letters
only): scored tokens are every held-out window; precision at 50 is the share of the 50 top-ranked
contexts (tokens, at most one per 8 positions of a window) that come from the held-out letters
(Galatians, Jude), next to their share of all scored tokens.

    python benchmarks/diffing.py                                 # full run (see README)
    python benchmarks/diffing.py --quick --out bench_out/diffing_q
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, markdown, prepare, record, table_spec
from sklearn.metrics import roc_auc_score
from torch import Tensor

from itda_lens import zoo
from itda_lens.activations import collect_activations
from itda_lens.cli import main as cli
from itda_lens.diffing import (
    DIFF_CONFIG,
    TokenScores,
    build_pair,
    paired_grids,
    relative_error,
    token_scores,
)
from itda_lens.training import train_sae
from itda_lens.zoo.corpus import EPISTLES, document_books

BASE = "kjv-4l128-s0"
PLANTED = "kjv-4l128-s0-planted"
SHIFTED = "kjv-4l128-s0-epistles"
TOP = 50
SAE_EPOCHS = 4
ITDA_SCORES = ("base_gap", "ft_gap", "ft_dict_gap", "base_dict_gap", "base_on_ft", "ft_on_base")


def auroc(scores: Tensor, positive: Tensor) -> float:
    ok = ~scores.isnan()
    return float(roc_auc_score(positive[ok].numpy(), scores[ok].numpy()))


def precision_at(scores: Tensor, positive: Tensor, n: int = TOP) -> float:
    flat = torch.nan_to_num(scores, nan=-torch.inf).flatten()
    top = torch.argsort(flat, descending=True, stable=True)[:n]
    return float(positive.flatten()[top].float().mean())


def context_precision(scores: Tensor, tokens: Tensor, positive: Tensor, n: int = TOP) -> float:
    """Share of the ``n`` top contexts (TokenScores.top: one token per 8 positions) that are positive."""
    top = TokenScores(tokens, {"s": scores}).top("s", n)  # type: ignore[dict-item]
    return sum(bool(positive[s, p]) for s, p, _ in top) / max(1, len(top))


def grid_scores(
    base: Any, ft: Any, tokens: Tensor, hooks: list[str], fn: Callable[..., Tensor]
) -> dict[str, Tensor]:
    """``fn(hook, x_base, x_ft) -> [n]`` on every non-special token, as [n_seq, seq] grids."""
    _, grids = paired_grids(
        base, ft, tokens, hooks, lambda h, xb, xf: {"s": fn(h, xb, xf)}, progress=False
    )
    return {h: grids[h]["s"] for h in hooks}


@torch.no_grad()
def output_kl(base: Any, ft: Any, tokens: Tensor, batch_size: int = 32) -> Tensor:
    """KL(p_ft || p_base) of the next-token distribution at every position: [n_seq, seq]."""
    rows = []
    for s in range(0, tokens.shape[0], batch_size):
        t = tokens[s : s + batch_size]
        lf = ft(t, return_type="logits").log_softmax(-1)
        lb = base(t, return_type="logits").log_softmax(-1)
        rows.append((lf.exp() * (lf - lb)).sum(-1).double())
    return torch.cat(rows)


def itda_variant(
    base: Any, ft: Any, build_tokens: Tensor, scored: Tensor, hooks: list[str], **changes: Any
) -> tuple[dict[str, TokenScores], float, dict[str, int]]:
    t0 = time.perf_counter()
    d_base, d_ft = build_pair(
        base, ft, build_tokens, hooks, DIFF_CONFIG.replace(**changes), progress=False
    )
    scores = token_scores(base, ft, d_base, d_ft, scored, progress=False)
    atoms = {h: d_base[h].cfg.d_sae for h in hooks}
    return scores, time.perf_counter() - t0, atoms


def sae_scores(
    base: Any, ft: Any, build_tokens: Tensor, scored: Tensor, hooks: list[str], quick: bool
) -> tuple[dict[str, dict[str, Tensor]], float]:
    t0 = time.perf_counter()
    saes = {}
    for h in hooks:
        cached = collect_activations(base, build_tokens, h)
        n = cached.acts.shape[0]
        saes[h] = train_sae(
            cached,
            architecture="topk",
            d_sae=8 * cached.acts.shape[1],
            k=DIFF_CONFIG.k,
            training_tokens=(1 if quick else SAE_EPOCHS) * n,
            batch_size=256,
            model_name=BASE,
        ).sae.eval()

    def err(sae: Any, x: Tensor) -> Tensor:
        with torch.no_grad():
            return relative_error(x, sae.decode(sae.encode(x)))

    raw = grid_scores(base, ft, scored, hooks, lambda h, xb, xf: err(saes[h], xf))
    own = grid_scores(base, ft, scored, hooks, lambda h, xb, xf: err(saes[h], xb))
    seconds = time.perf_counter() - t0
    return {"sae_on_ft": raw, "sae_gap": {h: raw[h] - own[h] for h in hooks}}, seconds


def all_scores(
    base: Any,
    ft: Any,
    build_plain: Tensor,
    build_ft_text: Tensor | None,
    scored: Tensor,
    hooks: list[str],
    quick: bool,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, float], dict[str, Any]]:
    """Every method's per-token grids {method: {hook: grid}}, its seconds, and notes."""
    methods: dict[str, dict[str, Tensor]] = {}
    seconds: dict[str, float] = {}
    notes: dict[str, Any] = {}
    variants: dict[str, tuple[Tensor, dict[str, Any]]] = {"ITDA": (build_plain, {})}
    if not quick:
        variants["ITDA, cos 0.9"] = (build_plain, {"cos_threshold": 0.9})
        variants["ITDA, other window order"] = (build_plain.flip(0), {})
    if build_ft_text is not None:
        variants["ITDA on fine-tuning text"] = (build_ft_text, {})
    for label, (stream, changes) in variants.items():
        scores, secs, atoms = itda_variant(base, ft, stream, scored, hooks, **changes)
        for s in ITDA_SCORES if label == "ITDA" else ITDA_SCORES[:2]:
            methods[f"{label}: {s}"] = {h: scores[h].scores[s] for h in hooks}  # type: ignore[index]
            seconds[f"{label}: {s}"] = secs
        notes[f"atoms ({label})"] = atoms
        print(f"  {label}: {secs:.1f} s, base atoms {atoms}", flush=True)
    t0 = time.perf_counter()
    methods["|h_ft - h_base|"] = grid_scores(
        base, ft, scored, hooks, lambda h, xb, xf: (xf - xb).double().norm(dim=-1)
    )
    seconds["|h_ft - h_base|"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kl = output_kl(base, ft, scored)
    mask = methods["|h_ft - h_base|"][hooks[0]].isnan()
    kl[mask] = torch.nan
    methods["output KL"] = dict.fromkeys(hooks, kl)
    seconds["output KL"] = time.perf_counter() - t0
    sae, secs = sae_scores(base, ft, build_plain, scored, hooks, quick)
    for name, grids in sae.items():
        methods[f"TopK SAE: {name}"] = grids
        seconds[f"TopK SAE: {name}"] = secs
    print(f"  baselines done ({secs:.1f} s for the SAEs)", flush=True)
    return methods, seconds, notes


def cli_run(out: str) -> dict[str, Any]:
    """The acceptance command with its defaults: wall-clock and the planted share of its top
    contexts per layer."""
    t0 = time.perf_counter()
    code = cli(["diff", BASE, PLANTED, "--out", f"{out}/cli_diff", "--overwrite"])
    seconds = time.perf_counter() - t0
    marks = zoo.load_token_marks("heldout", variant="planted")
    summary = json.loads(Path(out, "cli_diff", "diff.json").read_text())
    hits = {
        layer["hook"]: sum(
            bool(marks[c["sequence"], c["position"]]) for c in layer["top_contexts"]["fine-tune"]
        )
        for layer in summary["layers"]
    }
    return {"exit_code": code, "seconds": round(seconds, 1), "planted_in_top10": hits}


def main() -> None:
    args = bench_parser(__doc__, "bench_out/diffing").parse_args()
    out = prepare(args)
    t_start = time.perf_counter()
    cli = cli_run(str(out)) if not args.quick else None
    if cli is not None:
        print(f"itda-lens diff {BASE} {PLANTED}: {cli}", flush=True)
    tok = zoo.model_card(BASE)["tokenizer"]
    n_build = 64 if args.quick else 1024
    hooks = [f"blocks.{i}.hook_resid_post" for i in ((1, 2) if args.quick else range(4))]
    base = zoo.load_model(BASE)
    build_plain = zoo.load_tokens("train", n_build, tokenizer=tok)
    build_planted = zoo.load_tokens("train", n_build, tokenizer=tok, variant="planted")

    # --- planted ---------------------------------------------------------------------------
    held = zoo.load_tokens("heldout", None, tokenizer=tok, shuffle=False, variant="planted")
    marks = zoo.load_token_marks("heldout", None, tokenizer=tok, shuffle=False, variant="planted")
    rows_with = marks.any(dim=1)
    if args.quick:
        rows_with &= torch.arange(len(rows_with)) < 96
    scored, positive = held[rows_with], marks[rows_with]
    print(
        f"planted: {int(positive.sum())} trigger/phrase tokens of {scored.numel()} "
        f"in {scored.shape[0]} held-out windows",
        flush=True,
    )
    planted_ft = zoo.load_model(PLANTED)
    methods, seconds, notes = all_scores(
        base, planted_ft, build_plain, build_planted, scored, hooks, args.quick
    )
    planted_rows = []
    for name, grids in methods.items():
        row: dict[str, Any] = {"score": name, "seconds": round(seconds[name], 1)}
        for h in hooks:
            row[h] = {
                "auroc": auroc(grids[h], positive),
                "p50": precision_at(grids[h], positive),
            }
        planted_rows.append(row)

    # --- domain shift ----------------------------------------------------------------------
    plain_held = zoo.load_tokens("heldout", None, tokenizer=tok, shuffle=False)
    spans = zoo.load_token_spans("heldout", None, tokenizer=tok, shuffle=False)
    if args.quick:
        plain_held, spans = plain_held[::4], spans[::4]
    books = document_books()
    from_letters = torch.tensor(
        [[d >= 0 and books[d] in EPISTLES for d in row] for row in spans[..., 0].tolist()]
    )
    shifted_ft = zoo.load_model(SHIFTED)
    print(
        f"domain shift: {int(from_letters.sum())} of {plain_held.numel()} held-out tokens are "
        "from the letters",
        flush=True,
    )
    methods_ds, seconds_ds, notes_ds = all_scores(
        base, shifted_ft, build_plain, None, plain_held, hooks, args.quick
    )
    valid = ~methods_ds["|h_ft - h_base|"][hooks[0]].isnan()
    base_rate = float(from_letters[valid].float().mean())
    shift_rows = []
    for name, grids in methods_ds.items():
        row = {"score": name, "seconds": round(seconds_ds[name], 1)}
        for h in hooks:
            row[h] = {
                "p50": context_precision(grids[h], plain_held, from_letters),
                "auroc": auroc(grids[h], from_letters),
            }
        shift_rows.append(row)

    layer = lambda h: f"layer {h.split('.')[1]}"  # noqa: E731
    planted_table = table_spec(
        [
            {
                "score": r["score"],
                **{layer(h): f"{r[h]['auroc']:.3f} / {r[h]['p50']:.2f}" for h in hooks},
                "seconds": r["seconds"],
            }
            for r in planted_rows
        ],
        ["score", *map(layer, hooks), "seconds"],
    )
    shift_table = table_spec(
        [
            {
                "score": r["score"],
                **{layer(h): f"{r[h]['p50']:.2f} ({r[h]['auroc']:.3f})" for h in hooks},
                "seconds": r["seconds"],
            }
            for r in shift_rows
        ]
        + [
            {
                "score": "(share of scored tokens from the letters)",
                **{layer(h): f"{base_rate:.2f}" for h in hooks},
            }
        ],
        ["score", *map(layer, hooks), "seconds"],
    )

    print("\nplanted: AUROC / precision at 50, per layer")
    print(markdown(planted_table))
    print("\ndomain shift: precision at 50 contexts (AUROC), per layer")
    print(markdown(shift_table))
    record(
        "diffing",
        args,
        {"planted": planted_table, "domain_shift": shift_table},
        {
            "hooks": hooks,
            "build_windows": n_build,
            "config": DIFF_CONFIG.to_dict(),
            "planted": {
                "rows": planted_rows,
                "positives": int(positive.sum()),
                "tokens": scored.numel(),
                **notes,
            },
            "domain_shift": {"rows": shift_rows, "base_rate": base_rate, **notes_ds},
            "cli": cli,
        },
        time.perf_counter() - t_start,
    )


if __name__ == "__main__":
    main()
