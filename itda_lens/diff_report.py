"""The ``itda-lens diff`` report: a markdown page with plots and a JSON twin, from
:func:`itda_lens.diffing.diff_models`'s per-layer results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import extract_layer_from_tlens_hook_name

from itda_lens.analysis import in_context
from itda_lens.diffing import DIRECTIONS, LayerDiff
from itda_lens.plots import histograms, line_plot


def _md(text: str) -> str:
    """Context text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("[[", "**").replace("]]", "**")


def _contexts(diff: LayerDiff, tokenizer: Any, side: str, n: int) -> list[dict[str, Any]]:
    grid = diff.scores.tokens
    return [
        {"sequence": s, "position": p, "score": v, "context": in_context(tokenizer, grid[s], p)}
        for s, p, v in diff.scores.top(DIRECTIONS[side], n)
    ]


def _atoms(diff: LayerDiff, tokenizer: Any, side: str, n: int) -> list[dict[str, Any]]:
    grid = diff.scores.tokens
    return [
        {
            "atom": a,
            "sequence": s,
            "position": p,
            "score": v,
            "shared_label": shared,
            "context": in_context(tokenizer, grid[s], p),
        }
        for a, s, p, v, shared in diff.worst_atoms(side, n)
    ]


def layer_summary(diff: LayerDiff, tokenizer: Any, top: int) -> dict[str, Any]:
    """One layer of the report as plain data (what diff.json holds)."""
    score_stats = {}
    for name, grid in diff.scores.scores.items():
        v = grid[~grid.isnan()]
        score_stats[name] = {
            "mean": float(v.mean()),
            "p99": float(torch.quantile(v, 0.99)) if v.numel() else float("nan"),
        }
    return {
        "hook": diff.hook,
        "atoms_base": diff.base.cfg.d_sae,
        "atoms_ft": diff.ft.cfg.d_sae,
        "shared_labels": diff.shared_atoms,
        "jaccard": diff.jaccard,
        "scores": score_stats,
        "top_contexts": {side: _contexts(diff, tokenizer, side, top) for side in DIRECTIONS},
        "worst_atoms": {side: _atoms(diff, tokenizer, side, top) for side in DIRECTIONS},
    }


def write_diff_report(
    diffs: Sequence[LayerDiff],
    out: str | Path,
    tokenizer: Any,
    *,
    base_name: str,
    ft_name: str,
    data_name: str,
    top: int = 10,
    seconds: float | None = None,
) -> Path:
    """report.md, diff.json, jaccard.png and scores.png in ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = [layer_summary(d, tokenizer, top) for d in diffs]
    cfg = diffs[0].base.cfg
    record = diffs[0].base.require_build_record()
    n_tokens = int((~diffs[0].scores.scores["base_gap"].isnan()).sum())
    summary = {
        "base": base_name,
        "fine_tune": ft_name,
        "data": data_name,
        "tokens_scored": n_tokens,
        "k": cfg.k,
        "cos_threshold": record.cos_threshold,
        "seconds": seconds,
        "layers": layers,
    }
    (out / "diff.json").write_text(json.dumps(summary, indent=2))
    x = [extract_layer_from_tlens_hook_name(layer["hook"]) for layer in layers]
    if None in x or len(set(x)) != len(x):  # not one hook per layer: number them
        x = list(range(len(layers)))
    line_plot(
        {
            "label Jaccard": (x, [layer["jaccard"] for layer in layers]),
            "fine-tune atoms new to the base": (
                x,
                [1 - layer["shared_labels"] / max(1, layer["atoms_ft"]) for layer in layers],
            ),
        },
        out / "jaccard.png",
        xlabel="layer",
        ylabel="fraction",
        title=f"ITDA dictionaries: {base_name} vs {ft_name}",
    )
    histograms(
        {
            d.hook: d.scores.scores[DIRECTIONS["fine-tune"]][
                ~d.scores.scores[DIRECTIONS["fine-tune"]].isnan()
            ].tolist()
            for d in diffs
        },
        out / "scores.png",
        xlabel=f"per-token score ({DIRECTIONS['fine-tune']})",
        title="how much worse the base dictionary does on the fine-tune's activation",
    )
    (out / "report.md").write_text(_markdown(summary))
    return out / "report.md"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# ITDA model diff: {summary['base']} → {summary['fine_tune']}",
        "",
        f"Both models' dictionaries were built over the same {summary['tokens_scored']:,} tokens "
        f"of `{summary['data']}` (k = {summary['k']}, cos threshold {summary['cos_threshold']}), "
        "so their atoms share one label space, and every token was scored in both directions. "
        f"**Fine-tune side** (`{DIRECTIONS['fine-tune']}`): how much worse the base dictionary "
        "reconstructs the fine-tune's activation than the base's own (relative squared error). "
        f"**Base side** (`{DIRECTIONS['base']}`): the reverse. High scores are where the models "
        "differ.",
        "",
        "| layer | base atoms | fine-tune atoms | shared labels | Jaccard | mean score (fine-tune side) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for layer in summary["layers"]:
        lines.append(
            f"| {layer['hook']} | {layer['atoms_base']:,} | {layer['atoms_ft']:,} | "
            f"{layer['shared_labels']:,} | {layer['jaccard']:.3f} | "
            f"{layer['scores'][DIRECTIONS['fine-tune']]['mean']:.4f} |"
        )
    lines += [
        "",
        "![Jaccard per layer](jaccard.png) ![score distributions](scores.png)",
        "",
    ]
    for layer in summary["layers"]:
        lines += [f"## {layer['hook']}", ""]
        for side in DIRECTIONS:
            lines += [
                f"### Top contexts, {side} side",
                "",
                "| score | context (token in bold) |",
                "|---:|---|",
                *(
                    f"| {c['score']:.4f} | {_md(c['context'])} |"
                    for c in layer["top_contexts"][side]
                ),
                "",
                f"### {side.capitalize()} atoms the other dictionary reconstructs worst",
                "",
                "| atom | score | other side has an atom here | where it was read (token in bold) |",
                "|---:|---:|:---:|---|",
                *(
                    f"| {a['atom']} | {a['score']:.4f} | {'yes' if a['shared_label'] else 'no'} "
                    f"| {_md(a['context'])} |"
                    for a in layer["worst_atoms"][side]
                ),
                "",
            ]
    lines.append(
        "Scores: `diff.json` (every number above). Next: open the atoms in a dashboard "
        "(`itda-lens dashboard OUT/itdas/fine-tune/HOOK`)."
    )
    return "\n".join(lines) + "\n"
