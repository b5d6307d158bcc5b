"""Layer matching across zoo seeds and sizes: ITDA Jaccard against CKA, SVCCA, relative
representations and linear regression (the paper's Table 1, on our models), plus cross-tokenizer
span overlap and dictionary convergence over training.

For every ordered pair of different models of the same depth and every layer i of the first, is the
most similar layer of the second layer i? Accuracy is reported without self-pairs (the paper
counted them, which every measure gets right) and with them. ITDAs are built for all layers of a
model in one pass over the same shuffled training windows (k = 8, cos_threshold = 0.9, the exact
sequential add rule), so their (sequence, position) labels are comparable; the baselines see the
activations of the same held-out tokens, accumulated as moments (no N x N matrices); mutual kNN,
CKNNA (k = 10), debiased CKA and orthogonal Procrustes see a fixed sample of 2,048 of them. Also
recorded: each layer's atom count and how many of its atoms come from the first batch (under the
reference code's batch rule most of them did), the model-level Jaccard of every pair, the
cross-tokenizer span overlap and the convergence of the dictionaries over training.

    python benchmarks/layer_matching.py                   # full run (see benchmarks/README.md)
    python benchmarks/layer_matching.py --quick --out bench_out/layer_matching_q
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import build_itda, zoo
from itda_lens.activations import hook_activations, special_token_ids
from itda_lens.plots import heatmap, line_plot
from itda_lens.similarity import (
    PairStats,
    cknna,
    debiased_cka,
    jaccard,
    layer_matching_accuracy,
    model_jaccard,
    mutual_knn,
    procrustes_similarity,
    similarity_matrix,
    span_jaccard,
)

#: ITDA at one threshold (sizes differ by layer and model), and cropped to equal size: the first
#: N atoms of each, N the smallest dictionary (exactly what a max_atoms=N build keeps)
ITDA_MEASURES = ("ITDA Jaccard", "ITDA Jaccard, equal size")
#: on a shared sample of held-out tokens (n x n kernels): mutual kNN and CKNNA at k = 10 (Huh et
#: al. 2024), debiased CKA, orthogonal Procrustes
SAMPLE_MEASURES = ("mutual kNN", "CKNNA", "debiased CKA", "Procrustes")
MEASURES = (
    *ITDA_MEASURES, "linear CKA", "SVCCA", "relative", "linear regression R2", *SAMPLE_MEASURES
)  # fmt: skip
KNN = 10
K, COS = 8, 0.9
BATCH = 8  # windows per forward pass (the exact rule's dictionaries do not depend on it)


def hooks_of(model: Any) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]


def layer_acts(model: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's activations at the non-special positions of ``tokens``."""
    hooks = hooks_of(model)
    keep = ~torch.isin(tokens.reshape(-1), torch.tensor(special_token_ids(model)))
    out: list[list[torch.Tensor]] = [[] for _ in hooks]
    for start in range(0, tokens.shape[0], 32):
        acts = hook_activations(model, tokens[start : start + 32], hooks, None)
        for i, h in enumerate(hooks):
            out[i].append(acts[h].reshape(-1, acts[h].shape[-1]))
    return [torch.cat(a)[keep] for a in out]


def baseline_matrices(
    acts_a: list[torch.Tensor],
    acts_b: list[torch.Tensor],
    anchors: torch.Tensor,
    sample: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every baseline measure for every layer pair (i of a, j of b); the sample measures on the
    tokens ``sample``."""
    mats = {m: torch.zeros(len(acts_a), len(acts_b)) for m in MEASURES[len(ITDA_MEASURES) :]}
    for i, j in itertools.product(range(len(acts_a)), range(len(acts_b))):
        x, y = acts_a[i], acts_b[j]
        xs, ys = x[sample], y[sample]
        mats["mutual kNN"][i, j] = mutual_knn(xs, ys, KNN)
        mats["CKNNA"][i, j] = cknna(xs, ys, KNN)
        mats["debiased CKA"][i, j] = debiased_cka(xs, ys)
        mats["Procrustes"][i, j] = procrustes_similarity(xs, ys)
        s = PairStats(anchors_x=x[anchors], anchors_y=y[anchors])
        for start in range(0, x.shape[0], 8192):
            s.update(x[start : start + 8192], y[start : start + 8192])
        mats["linear CKA"][i, j] = s.linear_cka()
        mats["SVCCA"][i, j] = s.svcca()
        mats["relative"][i, j] = s.relative()
        mats["linear regression R2"][i, j] = (
            s.linreg_r2()
        )  # layer j of b predicted from layer i of a
    return mats


def main() -> None:
    args = bench_parser(__doc__, "bench_out/layer_matching").parse_args()
    out = prepare(args)
    t0 = time.perf_counter()
    # seeds only: not the fine-tunes of s0 (kjv-4l128-s0-planted, ...)
    small = [n for n in zoo.list_models() if re.fullmatch(r"kjv-4l128-s\d+", n)][
        : 2 if args.quick else None
    ]
    large = [n for n in zoo.list_models() if re.fullmatch(r"kjv-6l160-s\d+", n)][
        : 0 if args.quick else None
    ]
    build_windows, act_windows, n_anchors = (32, 16, 50) if args.quick else (1024, 128, 300)
    n_sample = 256 if args.quick else 2048
    build_tokens = zoo.load_tokens("train", build_windows)
    act_tokens = zoo.load_tokens("heldout", act_windows)
    itdas, acts = {}, {}
    atom_rows: list[dict[str, Any]] = []
    for name in small + large:
        model = zoo.load_model(name)
        built = build_itda(
            model,
            build_tokens,
            hooks_of(model),
            k=K,
            cos_threshold=COS,
            batch_size=BATCH,
            progress=False,
            model_name=name,
            dataset_path="kjv:train",
        )
        itdas[name] = [built[h] for h in hooks_of(model)]
        acts[name] = layer_acts(model, act_tokens)
        atom_rows.append(atom_counts(name, itdas[name], build_tokens))
        print(
            f"{name}: atoms per layer {atom_rows[-1]['atoms per layer']} "
            f"({atom_rows[-1]['from the first batch']} from the first batch)",
            flush=True,
        )
    phases = {"builds and activations": time.perf_counter() - t0}
    n_tok = acts[small[0]][0].shape[0]
    anchors = torch.randperm(n_tok, generator=torch.Generator().manual_seed(42))[:n_anchors]
    sample = torch.randperm(n_tok, generator=torch.Generator().manual_seed(7))[:n_sample]
    matrices: dict[str, dict[tuple[str, str], torch.Tensor]] = {m: {} for m in MEASURES}
    names = small + large
    n_equal = min(i.cfg.d_sae for n in names for i in itdas[n])
    cropped = {n: [i.crop(n_equal) for i in itdas[n]] for n in names}
    for a, b in itertools.product(names, names):
        matrices["ITDA Jaccard"][(a, b)] = similarity_matrix(itdas[a], itdas[b], jaccard)
        matrices["ITDA Jaccard, equal size"][(a, b)] = similarity_matrix(
            cropped[a], cropped[b], jaccard
        )
        for m, mat in baseline_matrices(acts[a], acts[b], anchors, sample).items():
            matrices[m][(a, b)] = mat
    groups = {"same size (4 x 128 seeds)": small, "same size (6 x 160 seeds)": large}
    rows = []
    for measure in MEASURES:
        row: dict[str, Any] = {"measure": measure}
        for label, members in groups.items():
            if len(members) < 2:
                continue
            sub = {
                k: v for k, v in matrices[measure].items() if k[0] in members and k[1] in members
            }
            row[f"{label}, no self-pairs"] = f"{layer_matching_accuracy(sub):.2f}"
            row[f"{label}, with self-pairs"] = (
                f"{layer_matching_accuracy(sub, include_self=True):.2f}"
            )
        if large:  # cross-size: is the argmax at the layer of nearest relative depth?
            hits = total = 0
            for a, b in itertools.product(small, large):
                m = matrices[measure][(a, b)]
                want = torch.round(
                    torch.arange(m.shape[0]) * (m.shape[1] - 1) / (m.shape[0] - 1)
                ).long()
                hits += int((m.argmax(1) == want).sum())
                total += m.shape[0]
            row["cross size (4 x 128 -> 6 x 160), nearest relative depth"] = f"{hits / total:.2f}"
        rows.append(row)
    accuracy_cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"equal size: the first {n_equal} atoms of every dictionary")
    print(table(rows, accuracy_cols))
    atom_cols = list(atom_rows[0])
    print(table(atom_rows, atom_cols))
    for measure in MEASURES:
        a, b = small[0], small[1]
        layers = [f"L{i}" for i in range(matrices[measure][(a, b)].shape[0])]
        heatmap(
            matrices[measure][(a, b)].tolist(),
            out / f"heatmap_{measure.replace(' ', '_')}.png",
            rows=layers,
            cols=layers,
            title=f"{measure}: {a} vs {b}",
            xlabel=b,
            ylabel=a,
        )
        if large:
            mat = matrices[measure][(small[0], large[0])]
            heatmap(
                mat.tolist(),
                out / f"heatmap_cross_size_{measure.replace(' ', '_')}.png",
                rows=[f"L{i}" for i in range(mat.shape[0])],
                cols=[f"L{j}" for j in range(mat.shape[1])],
                title=f"{measure}: {small[0]} vs {large[0]}",
                xlabel=large[0],
                ylabel=small[0],
            )
    model_level = {
        f"{a} vs {b}": round(model_jaccard(itdas[a], itdas[b]), 3)
        for a, b in itertools.combinations(names, 2)
    }
    print("model-level ITDA Jaccard (union over layers):", json.dumps(model_level))
    model_rows = [
        {
            "model a": a,
            "model b": b,
            "pair": "same size" if (a in small) == (b in small) else "cross size",
            "Jaccard": f"{model_level[f'{a} vs {b}']:.3f}",
        }
        for a, b in itertools.combinations(names, 2)
    ]
    # cross-tokenizer: the same documents in canonical order, two tokenizers, overlap of text spans
    cross_tok = [
        n for n in zoo.list_models() if zoo.model_card(n)["tokenizer"] != zoo.DEFAULT_TOKENIZER
    ][:1]
    phases["similarities and heatmaps"] = time.perf_counter() - t0 - sum(phases.values())
    span_result = {}
    if cross_tok:
        span_result = cross_tokenizer(small[0], cross_tok[0], 16 if args.quick else 256, out)
        print(
            f"cross-tokenizer span Jaccard ({span_result['windows']} windows; the diagonal is "
            f"every row's maximum: {span_result['diagonal_is_row_max']}):"
        )
        print(table(span_result["rows"], span_result["columns"]))
    phases["cross-tokenizer"] = time.perf_counter() - t0 - sum(phases.values())
    convergence = training_convergence(build_tokens, out, itdas)
    phases["convergence"] = time.perf_counter() - t0 - sum(phases.values())
    print("seconds per phase:", json.dumps({k: round(v, 1) for k, v in phases.items()}))
    print(
        "dictionary convergence (Jaccard with the final model's ITDA, per layer):",
        json.dumps(convergence),
    )
    steps = convergence["steps"]
    conv_cols = ["layer", *(f"step {s}" for s in steps)]
    conv_rows = [
        {"layer": layer, **{f"step {s}": f"{v:.3f}" for s, v in zip(steps, curve, strict=True)}}
        for layer, curve in convergence.items()
        if layer not in ("steps", "atoms")
    ]
    conv_rows.append(
        {
            "layer": "atoms per layer",
            **{
                f"step {s}": " / ".join(map(str, n))
                for s, n in zip(steps, convergence["atoms"], strict=True)
            },
        }
    )
    print(table(conv_rows, conv_cols))
    tables = {
        "accuracy": table_spec(rows, accuracy_cols),
        "atoms": table_spec(atom_rows, atom_cols),
        "model_level": table_spec(model_rows, list(model_rows[0])),
        "convergence": table_spec(conv_rows, conv_cols),
    }
    if span_result:
        tables["cross_tokenizer"] = table_spec(span_result["rows"], span_result["columns"])
    record(
        "layer_matching",
        args,
        tables,
        {
            "accuracy": rows,
            "equal_size_atoms": n_equal,
            "atoms": atom_rows,
            "model_level_jaccard": model_level,
            "cross_tokenizer": span_result,
            "convergence": convergence,
            "matrices": {
                m: {f"{a}|{b}": v.tolist() for (a, b), v in mm.items()}
                for m, mm in matrices.items()
            },
            "build_windows": build_windows,
            "phase_seconds": phases,
            "heldout_windows": act_windows,
        },
        time.perf_counter() - t0,
    )


def atom_counts(name: str, itdas: list[Any], tokens: torch.Tensor) -> dict[str, Any]:
    """Atoms per layer, and how many of them come from the first batch of ``BATCH`` windows."""
    first = [int((it.atom_labels[:, 0] < BATCH).sum()) for it in itdas]
    total = [it.cfg.d_sae for it in itdas]
    return {
        "model": name,
        "tokens read": f"{itdas[0].require_build_record().tokens_seen:,}",
        "atoms per layer": " / ".join(map(str, total)),
        "from the first batch": " / ".join(map(str, first)),
        "share from the first batch": f"{sum(first) / sum(total):.1%}",
        "first batch's share of the tokens": f"{BATCH / tokens.shape[0]:.1%}",
    }


def cross_tokenizer(name_a: str, name_b: str, n_windows: int, out: Path) -> dict[str, Any]:
    """Span-anchored overlap of two models with different tokenizers, built on the same documents."""
    tok_a, tok_b = zoo.model_card(name_a)["tokenizer"], zoo.model_card(name_b)["tokenizer"]
    toks_a = zoo.load_tokens("train", n_windows, tokenizer=tok_a, shuffle=False)
    spans_a = zoo.load_token_spans("train", n_windows, tokenizer=tok_a, shuffle=False)
    last_doc = int(spans_a[:, :, 0].max())
    spans_b_all = zoo.load_token_spans("train", None, tokenizer=tok_b, shuffle=False)
    n_b = int(
        (spans_b_all[:, :, 0].amax(1) <= last_doc).sum()
    )  # windows of b over the same documents
    toks_b = zoo.load_tokens("train", n_b, tokenizer=tok_b, shuffle=False)
    itdas = {}
    for name, toks in ((name_a, toks_a), (name_b, toks_b)):
        model = zoo.load_model(name)
        built = build_itda(
            model, toks, hooks_of(model), k=K, cos_threshold=COS, batch_size=BATCH, progress=False
        )
        itdas[name] = [built[h] for h in hooks_of(model)]
    mat = torch.tensor(
        [
            [span_jaccard(x, spans_a, y, spans_b_all[:n_b]) for y in itdas[name_b]]
            for x in itdas[name_a]
        ]
    )
    layers = [f"L{i}" for i in range(mat.shape[0])]
    heatmap(
        mat.tolist(),
        out / "heatmap_cross_tokenizer_span_jaccard.png",
        rows=layers,
        cols=layers,
        title=f"span Jaccard: {name_a} vs {name_b}",
        xlabel=name_b,
        ylabel=name_a,
    )
    atoms = {name: [it.cfg.d_sae for it in itdas[name]] for name in itdas}
    head = [f"{name_b} L{j} ({n} atoms)" for j, n in enumerate(atoms[name_b])]
    cols = [f"{name_a} layer (atoms)", *head]
    return {
        "matrix": [[round(v, 3) for v in r] for r in mat.tolist()],
        "diagonal_is_row_max": bool((mat.argmax(1) == torch.arange(mat.shape[0])).all()),
        "windows": [n_windows, n_b],
        "atoms": atoms,
        "columns": cols,
        "rows": [
            {
                cols[0]: f"L{i} ({atoms[name_a][i]})",
                **{c: f"{v:.3f}" for c, v in zip(head, r, strict=True)},
            }
            for i, r in enumerate(mat.tolist())
        ],
    }


def training_convergence(
    tokens: torch.Tensor, out: Path, known: dict[str, list[Any]]
) -> dict[str, Any]:
    """Per layer: Jaccard of each checkpoint's ITDA with the final model's, over training steps
    (``known``: dictionaries already built on ``tokens`` with the same settings, reused)."""
    final = zoo.DEFAULT_MODEL
    ckpts = sorted(
        (n for n in zoo.list_models(include_checkpoints=True) if n.startswith(final + "@")),
        key=lambda n: int(n.split("@step")[1]),
    )
    steps = [int(n.split("@step")[1]) for n in ckpts] + [zoo.model_card(final)["steps"]]
    dicts = {name: known[name] for name in [*ckpts, final] if name in known}
    for name in [*ckpts, final]:
        if name in dicts:
            continue
        model = zoo.load_model(name)
        built = build_itda(
            model, tokens, hooks_of(model), k=K, cos_threshold=COS, batch_size=BATCH, progress=False
        )
        dicts[name] = [built[h] for h in hooks_of(model)]
    curves = {
        f"L{i}": [round(jaccard(dicts[n][i], dicts[final][i]), 3) for n in [*ckpts, final]]
        for i in range(len(dicts[final]))
    }
    line_plot(
        {layer: (steps, v) for layer, v in curves.items()},
        out / "convergence.png",
        xlabel="training step",
        ylabel="Jaccard with the final model's ITDA",
        title=f"Dictionary convergence, {final}",
    )
    atoms = [[it.cfg.d_sae for it in dicts[n]] for n in [*ckpts, final]]
    return {"steps": steps, **curves, "atoms": atoms}


if __name__ == "__main__":
    main()
