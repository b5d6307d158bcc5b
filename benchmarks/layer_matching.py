"""Layer matching across zoo seeds and sizes: ITDA measures (label Jaccard, ITDA transfer, probe
support Jaccard) against CKA, SVCCA, relative representations, linear regression, mutual kNN, CKNNA,
debiased CKA and Procrustes (the paper's Table 1, on our models), plus the path dependence of the
labels, every measure across tokenizers and dictionary convergence over training.

For every ordered pair of different models of the same depth (three seed families) and every layer
i of the first, is the most similar layer of the second layer i? Accuracy is reported without
self-pairs (the paper counted them, which every measure gets right) and with them. ITDAs are built
for all layers of a model in one pass over the same shuffled training windows (k = 8,
cos_threshold = 0.9, the exact sequential add rule), so their (sequence, position) labels are
comparable; the moment baselines see the activations of the same held-out tokens (no N x N
matrices); the ITDA probe measures, mutual kNN, CKNNA (k = 10), debiased CKA and orthogonal
Procrustes see a fixed sample of 2,048 of them. Also recorded: each layer's atom count and how many
of its atoms come from the first batch, the model-level Jaccard of every pair, how much of one
model's label set survives another window order or one flipped early verdict, every measure
across tokenizers (the 4 x 128 seeds against the bpe4096 model: ITDA labels anchored to the text,
baselines on held-out tokens at which both tokenizers end a token) and the convergence of the
dictionaries over training. The reference code's own
protocol (batch rule, start-up dictionary) and its ablations are the ``reference`` part
(`layer_matching_reference.py`), run by default after the main part.

    python benchmarks/layer_matching.py                   # full run, both parts (see README)
    python benchmarks/layer_matching.py --part main       # one part (the two can run in parallel)
    python benchmarks/layer_matching.py --quick --out bench_out/layer_matching_q
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import layer_matching_reference as reference
import torch
import torch.nn.functional as F
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import build_itda, zoo
from itda_lens.activations import (
    activations_at_labels,
    excluded_token_ids,
    hook_activations,
    special_token_ids,
)
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.plots import heatmap, line_plot
from itda_lens.similarity import (
    PairStats,
    SampleView,
    aligned_positions,
    cknna,
    debiased_cka,
    decomposition_transfer,
    jaccard,
    labels_by_span,
    layer_matching_accuracy,
    model_jaccard,
    mutual_knn,
    procrustes_similarity,
    relative_representation,
    set_jaccard,
    similarity_matrix,
    span_jaccard,
    support_jaccard,
    support_labels,
    transfer_similarity,
)

#: ITDA at one threshold (sizes differ by layer and model), and cropped to equal size: the first
#: N atoms of each, N the smallest dictionary (exactly what a max_atoms=N build keeps); on the
#: probe sample: ITDA transfer (each side's decompositions carried to the other model through the
#: atoms' provenance) and the Jaccard of each probe token's support labels
ITDA_MEASURES = (
    "ITDA Jaccard", "ITDA Jaccard, equal size", "ITDA transfer", "ITDA probe support Jaccard"
)  # fmt: skip
#: on a shared sample of held-out tokens (n x n kernels): mutual kNN and CKNNA at k = 10 (Huh et
#: al. 2024), debiased CKA, orthogonal Procrustes
SAMPLE_MEASURES = ("mutual kNN", "CKNNA", "debiased CKA", "Procrustes")
MEASURES = (
    *ITDA_MEASURES, "linear CKA", "SVCCA", "relative", "linear regression R2", *SAMPLE_MEASURES
)  # fmt: skip
#: across tokenizers: ITDA labels anchored to the text (no equal-size crop: sizes differ by
#: tokenizer), then the same baselines
CROSS_MEASURES = (
    "ITDA span Jaccard", "ITDA transfer", "ITDA probe support Jaccard", *MEASURES[len(ITDA_MEASURES):]
)  # fmt: skip
ACC = "accuracy, no self-pairs"
KNN = 10
#: layers of each family (cross-size rows pair families of different depth)
FAMILY_DEPTH = {"4 x 128": 4, "6 x 160": 6, "8 x 128": 8}
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
    views_a: list[SampleView],
    views_b: list[SampleView],
    rel_a: list[torch.Tensor],
    rel_b: list[torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every baseline measure for every layer pair (i of a, j of b), the sample measures on the
    prepared views of the sample tokens, relative representations from each layer's cosines to
    the anchors (``rel_*``); and linear regression the other way (layer i of a from layer j of b:
    every other measure is symmetric)."""
    mats = {m: torch.zeros(len(acts_a), len(acts_b)) for m in MEASURES[len(ITDA_MEASURES) :]}
    reverse = torch.zeros(len(acts_a), len(acts_b))
    for i, j in itertools.product(range(len(acts_a)), range(len(acts_b))):
        x, y = acts_a[i], acts_b[j]
        vx, vy = views_a[i], views_b[j]
        mats["mutual kNN"][i, j] = mutual_knn(vx, vy, KNN)
        mats["CKNNA"][i, j] = cknna(vx, vy, KNN)
        mats["debiased CKA"][i, j] = debiased_cka(vx, vy)
        mats["Procrustes"][i, j] = procrustes_similarity(vx, vy)
        s = PairStats()
        for start in range(0, x.shape[0], 8192):
            s.update(x[start : start + 8192], y[start : start + 8192])
        mats["linear CKA"][i, j] = s.linear_cka()
        mats["SVCCA"][i, j] = s.svcca()
        mats["relative"][i, j] = float(F.cosine_similarity(rel_a[i], rel_b[j], dim=1).mean())
        mats["linear regression R2"][i, j] = s.linreg_r2()  # layer j of b from layer i of a
        reverse[i, j] = s.linreg_r2(reverse=True)
    return mats, reverse


class Provenance:
    """Every model's activations at the union of all dictionaries' atom labels (so ITDA transfer
    can give any model's activations at any dictionary's atoms), gathered once per model."""

    def __init__(self, itdas: dict[str, list[Any]], tokens: torch.Tensor):
        self.width = tokens.shape[1]
        keys = torch.cat([self._keys(i.atom_labels) for v in itdas.values() for i in v]).unique()
        self.labels = torch.stack([keys // self.width, keys % self.width], 1)
        self.row = torch.full((tokens.numel(),), -1, dtype=torch.long)
        self.row[keys] = torch.arange(len(keys))
        self.tokens = tokens
        self.acts: dict[str, list[torch.Tensor]] = {}

    def _keys(self, labels: torch.Tensor) -> torch.Tensor:
        return labels[:, 0] * self.width + labels[:, 1]

    def read(self, name: str, model: Any) -> None:
        hooks = hooks_of(model)
        got = activations_at_labels(model, self.tokens, hooks, self.labels)
        self.acts[name] = [got[h].float() for h in hooks]

    def at(self, name: str, layer: int, itda: Any) -> torch.Tensor:
        """Model ``name``'s activations at ``itda``'s atoms, in atom order."""
        return self.acts[name][layer][self.row[self._keys(itda.atom_labels)]]


def itda_probe_matrices(
    a: str,
    b: str,
    itdas: dict[str, list[Any]],
    probe: dict[str, list[torch.Tensor]],
    codes: dict[str, list[Any]],
    supports: dict[str, list[torch.Tensor]],
    prov: Provenance,
) -> dict[str, torch.Tensor]:
    """ITDA transfer and probe support Jaccard for every layer pair (i of a, j of b)."""
    la, lb = len(itdas[a]), len(itdas[b])
    transfer, support = torch.zeros(la, lb), torch.zeros(la, lb)
    for i, j in itertools.product(range(la), range(lb)):
        x, y = itdas[a][i], itdas[b][j]
        transfer[i, j] = transfer_similarity(
            x, y, probe[a][i], probe[b][j], prov.at(b, j, x), prov.at(a, i, y),
            codes=(codes[a][i], codes[b][j]),
        )  # fmt: skip
        support[i, j] = support_jaccard(supports[a][i], supports[b][j])
    return {"ITDA transfer": transfer, "ITDA probe support Jaccard": support}


#: same-depth seed families of the zoo (the 8-layer one added to have more layers to tell apart)
FAMILIES = {
    "4 x 128": r"kjv-4l128-s\d+",
    "6 x 160": r"kjv-6l160-s\d+",
    "8 x 128": r"kjv-8l128-s\d+",
}


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/layer_matching")
    parser.add_argument(
        "--part",
        choices=("all", "main", "reference", "stability"),
        default="all",
        help="main: layer_matching.json; reference: the reference code's protocol and its "
        "ablations, layer_matching_reference.json; stability: ITDA transfer with the windows in "
        "other orders, layer_matching_stability.json (the parts can run as separate processes)",
    )
    reference.add_options(parser)
    args = parser.parse_args()
    out = prepare(args)
    if args.part in ("all", "main"):
        run_main(args, out)
    if args.part in ("all", "reference"):
        reference.run(args)
    if args.part in ("all", "stability"):
        run_stability(args, out)


def run_main(args: argparse.Namespace, out: Path) -> None:
    """Every measure on our builds; writes ``layer_matching.json``."""
    t0 = time.perf_counter()
    # seeds only: not the fine-tunes of s0 (kjv-4l128-s0-planted, ...)
    families = {
        label: [n for n in zoo.list_models() if re.fullmatch(pattern, n)]
        for label, pattern in FAMILIES.items()
    }
    if args.quick:
        families = {"4 x 128": families["4 x 128"][:2]}
    small = families["4 x 128"]
    build_windows, act_windows, n_anchors = (32, 16, 50) if args.quick else (1024, 128, 300)
    n_sample = 256 if args.quick else 2048
    build_tokens = zoo.load_tokens("train", build_windows)
    act_tokens = zoo.load_tokens("heldout", act_windows)
    names = [n for members in families.values() for n in members]
    itdas, acts = {}, {}
    atom_rows: list[dict[str, Any]] = []
    for name in names:
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
    prov = Provenance(itdas, build_tokens)
    for name in names:
        prov.read(name, zoo.load_model(name))
    phases = {"builds and activations": time.perf_counter() - t0}
    n_tok = acts[small[0]][0].shape[0]
    anchors = torch.randperm(n_tok, generator=torch.Generator().manual_seed(42))[:n_anchors]
    sample = torch.randperm(n_tok, generator=torch.Generator().manual_seed(7))[:n_sample]
    views = {n: [SampleView(a[sample]) for a in acts[n]] for n in names}
    probe = {n: [a[sample] for a in acts[n]] for n in names}
    codes = {
        n: [i.encode_sparse(p) for i, p in zip(itdas[n], probe[n], strict=True)] for n in names
    }
    supports = {
        n: [support_labels(i, p) for i, p in zip(itdas[n], probe[n], strict=True)] for n in names
    }
    matrices: dict[str, dict[tuple[str, str], torch.Tensor]] = {m: {} for m in MEASURES}
    n_equal = min(i.cfg.d_sae for n in names for i in itdas[n])
    cropped = {n: [i.crop(n_equal) for i in itdas[n]] for n in names}
    rel = {
        n: [relative_representation(a.double(), a[anchors].double()) for a in acts[n]]
        for n in names
    }
    family_of = {n: label for label, members in families.items() for n in members}
    for a, b in itertools.combinations_with_replacement(names, 2):
        if (
            family_of[a] != family_of[b]
            and FAMILY_DEPTH[family_of[a]] == FAMILY_DEPTH[family_of[b]]
        ):
            continue  # (no two families share a depth; every other pair is scored)
        # every measure but regression is symmetric: (b, a) is the transpose of (a, b)
        mats = {
            "ITDA Jaccard": similarity_matrix(itdas[a], itdas[b], jaccard),
            "ITDA Jaccard, equal size": similarity_matrix(cropped[a], cropped[b], jaccard),
            **itda_probe_matrices(a, b, itdas, probe, codes, supports, prov),
        }
        base, reverse = baseline_matrices(acts[a], acts[b], views[a], views[b], rel[a], rel[b])
        for m, mat in (mats | base).items():
            matrices[m][(a, b)] = mat
            matrices[m][(b, a)] = reverse.T if m == "linear regression R2" else mat.T
        print(f"{a} x {b} ({time.perf_counter() - t0:.0f} s)", flush=True)
    groups = {f"same size ({label} seeds)": members for label, members in families.items()}
    cross = [
        (la, lb) for la, lb in itertools.combinations(families, 2)
        if families[la] and families[lb] and FAMILY_DEPTH[la] != FAMILY_DEPTH[lb]
    ]  # fmt: skip
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
        for la, lb in cross:  # cross-size: is the argmax at the layer of nearest relative depth?
            hits = total = 0
            for a, b in itertools.product(families[la], families[lb]):
                m = matrices[measure][(a, b)]
                want = torch.round(
                    torch.arange(m.shape[0]) * (m.shape[1] - 1) / (m.shape[0] - 1)
                ).long()
                hits += int((m.argmax(1) == want).sum())
                total += m.shape[0]
            row[f"cross size ({la} -> {lb}), nearest relative depth"] = f"{hits / total:.2f}"
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
        deeper = [m[0] for label, m in families.items() if m and FAMILY_DEPTH[label] > 4]
        if deeper:
            large = deeper[-1:]
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
    first_two = [n for m in list(families.values())[:2] for n in m]  # as before the 8-layer family
    model_level = {
        f"{a} vs {b}": round(model_jaccard(itdas[a], itdas[b]), 3)
        for a, b in itertools.combinations(first_two, 2)
    }
    print("model-level ITDA Jaccard (union over layers):", json.dumps(model_level))
    model_rows = [
        {
            "model a": a,
            "model b": b,
            "pair": "same size" if (a in small) == (b in small) else "cross size",
            "Jaccard": f"{model_level[f'{a} vs {b}']:.3f}",
        }
        for a, b in itertools.combinations(first_two, 2)
    ]
    # cross-tokenizer: the same documents in canonical order, two tokenizers, overlap of text spans
    cross_tok = [
        n for n in zoo.list_models() if zoo.model_card(n)["tokenizer"] != zoo.DEFAULT_TOKENIZER
    ][:1]
    phases["similarities and heatmaps"] = time.perf_counter() - t0 - sum(phases.values())
    paths = path_dependence(small[0], small[1], itdas, build_tokens, 2 if args.quick else 3)
    path_cols = list(paths["rows"][0])
    print("path dependence of the exact rule's labels (Jaccard with the default build, per layer):")
    print(table(paths["rows"], path_cols))
    phases["path dependence"] = time.perf_counter() - t0 - sum(phases.values())
    span_result: dict[str, Any] = {}
    if cross_tok:
        seeds = small if args.quick else families["4 x 128"]
        sizes = (16 if args.quick else 256, act_windows, n_sample, n_anchors)
        span_result = cross_tokenizer(seeds, cross_tok[0], *sizes, out)
        # control: the same span path between seeds of one tokenizer (all but the last vs it)
        control = cross_tokenizer(seeds[:-1], seeds[-1], *sizes, None)
        span_result["control"] = {k: control[k] for k in ("pairs", "accuracy", "matrices")}
        across = f"across tokenizers ({len(span_result['pairs'])} pairs)"
        same = f"control: one tokenizer, the same span path ({len(control['pairs'])} pairs)"
        span_result["accuracy_rows"] = [
            {"measure": x["measure"], across: x[ACC], same: y[ACC]}
            for x, y in zip(span_result["accuracy"], control["accuracy"], strict=True)
        ]
        print(
            f"layer matching accuracy without self-pairs across tokenizers "
            f"({', '.join(span_result['pairs'])}; windows {span_result['windows']}, "
            f"{span_result['aligned_heldout_tokens']} aligned held-out tokens):"
        )
        print(table(span_result["accuracy_rows"], list(span_result["accuracy_rows"][0])))
        print(
            "span Jaccard of the first pair (the diagonal is every row's maximum: "
            f"{span_result['diagonal_is_row_max']}):"
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
        "path_dependence": table_spec(paths["rows"], path_cols),
        "convergence": table_spec(conv_rows, conv_cols),
    }
    if span_result:
        tables["cross_tokenizer"] = table_spec(span_result["rows"], span_result["columns"])
        tables["cross_tokenizer_accuracy"] = table_spec(
            span_result["accuracy_rows"], list(span_result["accuracy_rows"][0])
        )
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
            "path_dependence": paths,
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


def run_stability(args: argparse.Namespace, out: Path) -> None:
    """Does ITDA transfer's layer matching survive what should not matter? Every model's
    dictionaries are rebuilt on the same windows in other orders (the labels then differ: see the
    path dependence table) and the accuracy is recomputed on the same probe sample; writes
    ``layer_matching_stability.json``."""
    t0 = time.perf_counter()
    families = {
        label: [n for n in zoo.list_models() if re.fullmatch(FAMILIES[label], n)]
        for label in ("4 x 128", "8 x 128")
    }
    orders = {"4 x 128": [1], "8 x 128": [1]}
    if args.quick:
        families, orders = {"4 x 128": families["4 x 128"][:2]}, {"4 x 128": [1]}
    build_windows, act_windows = (32, 16) if args.quick else (1024, 128)
    n_sample = 256 if args.quick else 2048
    build_tokens = zoo.load_tokens("train", build_windows)
    act_tokens = zoo.load_tokens("heldout", act_windows)
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    for family, names in families.items():
        models = {n: zoo.load_model(n) for n in names}
        acts = {n: layer_acts(m, act_tokens) for n, m in models.items()}
        n_tok = acts[names[0]][0].shape[0]
        sample = torch.randperm(n_tok, generator=torch.Generator().manual_seed(7))[:n_sample]
        probe = {n: [a[sample] for a in acts[n]] for n in names}
        base: dict[str, torch.Tensor] = {}
        for seed in [0, *orders[family]]:
            order = (
                torch.arange(build_windows)
                if seed == 0
                else torch.randperm(build_windows, generator=torch.Generator().manual_seed(seed))
            )
            toks = build_tokens[order]
            itdas = {}
            for n, m in models.items():
                built = build_itda(
                    m, toks, hooks_of(m), k=K, cos_threshold=COS, batch_size=BATCH, progress=False
                )
                itdas[n] = [built[h] for h in hooks_of(m)]
            prov = Provenance(itdas, toks)
            for n, m in models.items():
                prov.read(n, m)
            codes = {
                n: [i.encode_sparse(p) for i, p in zip(itdas[n], probe[n], strict=True)]
                for n in names
            }
            supports = {
                n: [support_labels(i, p) for i, p in zip(itdas[n], probe[n], strict=True)]
                for n in names
            }
            transfer: dict[tuple[str, str], torch.Tensor] = {}
            labels: dict[tuple[str, str], torch.Tensor] = {}
            for a, b in itertools.combinations(names, 2):
                mats = itda_probe_matrices(a, b, itdas, probe, codes, supports, prov)
                transfer[(a, b)], transfer[(b, a)] = mats["ITDA transfer"], mats["ITDA transfer"].T
                lab = similarity_matrix(itdas[a], itdas[b], jaccard)
                labels[(a, b)], labels[(b, a)] = lab, lab.T
            moved = (
                max(float((transfer[k] - base[k]).abs().max()) for k in transfer) if base else 0.0
            )
            if not base:
                base = transfer
            rows.append(
                {
                    "family": f"{family} ({len(names)} seeds)",
                    "windows": "as in the main table"
                    if seed == 0
                    else f"another order (seed {seed})",
                    "ITDA transfer": f"{layer_matching_accuracy(transfer):.2f}",
                    "ITDA Jaccard": f"{layer_matching_accuracy(labels):.2f}",
                    "largest change of a transfer value": f"{moved:.3f}",
                }
            )
            data[f"{family}|{seed}"] = {
                "transfer": {f"{a}|{b}": v.tolist() for (a, b), v in transfer.items()},
                "atoms": {n: [i.cfg.d_sae for i in itdas[n]] for n in names},
            }
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    cols = list(rows[0])
    print("layer matching without self-pairs when the builds read the windows in other orders:")
    print(table(rows, cols))
    record(
        "layer_matching_stability",
        args,
        {"stability": table_spec(rows, cols)},
        {"rows": rows, "orders": data, "build_windows": build_windows, "probe_tokens": n_sample},
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


def _labels(itda: Any, order: torch.Tensor | None = None) -> set[tuple[int, int]]:
    """Atom labels, with windows renamed to their canonical index when read in ``order``."""
    seq, pos = itda.atom_labels[:, 0], itda.atom_labels[:, 1]
    if order is not None:
        seq = order[seq]
    return set(zip(seq.tolist(), pos.tolist(), strict=True))


def flipped_build(model: Any, tokens: torch.Tensor) -> tuple[list[set], list[set]]:
    """The exact rule over ``tokens`` read window by window, unchanged and with one early verdict
    flipped: after the first window, its first eligible token that did not become an atom is added."""
    hooks = hooks_of(model)
    excluded = torch.tensor(excluded_token_ids(model, "auto"))
    runs: list[list[set]] = []
    for flip in (False, True):
        builders = [
            ITDABuilder(model.cfg.d_model, BuildConfig(k=K, cos_threshold=COS)) for _ in hooks
        ]
        for w in range(tokens.shape[0]):
            toks = tokens[w : w + 1]
            acts = hook_activations(model, toks, hooks, None)
            labels = torch.stack([torch.full((toks.shape[1],), w), torch.arange(toks.shape[1])], 1)
            ids = toks.reshape(-1)
            eligible = ~torch.isin(ids, excluded)
            for h, b in zip(hooks, builders, strict=True):
                x = acts[h].reshape(-1, model.cfg.d_model)
                b.update(ActivationBatch(x, labels, ids, eligible))
                if flip and w == 0:
                    taken = {int(p) for p in b.store.labels[:, 1]}
                    j = next(i for i in range(len(ids)) if eligible[i] and i not in taken)
                    b.store.add(x[j : j + 1], labels[j : j + 1], ids[j : j + 1])
        runs.append([_labels(b.to_itda()) for b in builders])
    return runs[0], runs[1]


def path_dependence(
    name: str, other: str, itdas: dict[str, list[Any]], tokens: torch.Tensor, n_orders: int
) -> dict[str, Any]:
    """Per layer, Jaccard of the default build's labels with: the same model reading the same
    windows in other orders, the same model with one early verdict flipped, and another seed."""
    model = zoo.load_model(name)
    base = [_labels(i) for i in itdas[name]]
    rows: dict[str, list[float]] = {}
    for seed in range(1, n_orders):
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
        built = build_itda(
            model, tokens[order], hooks_of(model), k=K, cos_threshold=COS, batch_size=BATCH,
            progress=False,
        )  # fmt: skip
        labels = [_labels(built[h], order) for h in hooks_of(model)]
        rows[f"same model, windows in another order (seed {seed})"] = [
            set_jaccard(x, y) for x, y in zip(base, labels, strict=True)
        ]
    plain, flipped = flipped_build(model, tokens)
    rows["same model, one early verdict flipped"] = [
        set_jaccard(x, y) for x, y in zip(plain, flipped, strict=True)
    ]
    rows[f"another seed ({other}), same layer"] = [
        set_jaccard(x, _labels(y)) for x, y in zip(base, itdas[other], strict=True)
    ]
    cols = [f"L{i}" for i in range(len(base))]
    return {
        "model": name,
        "window_by_window_equals_build_itda": plain == base,
        "jaccard": rows,
        "rows": [
            {
                "compared with the default build": k,
                **{c: f"{v:.2f}" for c, v in zip(cols, vals, strict=True)},
            }
            for k, vals in rows.items()
        ],
    }


def _same_documents(split: str, n_windows: int, tok_a: str, tok_b: str) -> dict[str, Any]:
    """Canonical-order windows of two tokenizers over the same documents: A's ``n_windows`` and
    as many of B's as end within A's last document (so B covers all of A's text)."""
    toks_a = zoo.load_tokens(split, n_windows, tokenizer=tok_a, shuffle=False)
    spans_a = zoo.load_token_spans(split, n_windows, tokenizer=tok_a, shuffle=False)
    last_doc = int(spans_a[:, :, 0].max())
    spans_b = zoo.load_token_spans(split, None, tokenizer=tok_b, shuffle=False)
    n_b = int((spans_b[:, :, 0].amax(1) <= last_doc).sum()) + 1  # + the window that crosses
    n_b = min(n_b, spans_b.shape[0])
    toks_b = zoo.load_tokens(split, n_b, tokenizer=tok_b, shuffle=False)
    return {"a": (toks_a, spans_a), "b": (toks_b, spans_b[:n_b]), "windows": [n_windows, n_b]}


def cross_tokenizer(
    seeds: list[str],
    name_b: str,
    n_windows: int,
    act_windows: int,
    n_sample: int,
    n_anchors: int,
    out: Path | None,
) -> dict[str, Any]:
    """Every measure across tokenizers: each of ``seeds`` against ``name_b`` (another tokenizer),
    dictionaries built on the same documents in canonical order. ITDA labels are anchored to the
    text (document, character where the atom's token ends): span Jaccard, probe support Jaccard
    on those anchors, and ITDA transfer with each atom read in the other model at the token that
    covers its last character. The baselines and probe measures see held-out tokens at which both
    tokenizers end a token (the same text read by both). Heatmaps of the first pair in ``out``."""
    tok_a, tok_b = zoo.model_card(seeds[0])["tokenizer"], zoo.model_card(name_b)["tokenizer"]
    build = _same_documents("train", n_windows, tok_a, tok_b)
    held = _same_documents("heldout", act_windows, tok_a, tok_b)
    at_a, at_b = aligned_positions(held["a"][1], held["b"][1])
    n_tok = at_a.shape[0]
    anchors = torch.randperm(n_tok, generator=torch.Generator().manual_seed(42))[:n_anchors]
    sample = torch.randperm(n_tok, generator=torch.Generator().manual_seed(7))[:n_sample]
    names = [*seeds, name_b]
    side = {n: "b" if n == name_b else "a" for n in names}
    itdas, acts, models = {}, {}, {}
    for name in names:
        model = models[name] = zoo.load_model(name)
        toks = build[side[name]][0]
        built = build_itda(
            model, toks, hooks_of(model), k=K, cos_threshold=COS, batch_size=BATCH, progress=False
        )
        itdas[name] = [built[h] for h in hooks_of(model)]
        got = activations_at_labels(
            model, held[side[name]][0], hooks_of(model), at_a if side[name] == "a" else at_b
        )
        acts[name] = [got[h].float() for h in hooks_of(model)]
    views = {n: [SampleView(x[sample]) for x in acts[n]] for n in names}
    probe = {n: [x[sample] for x in acts[n]] for n in names}
    rel = {
        n: [relative_representation(x.double(), x[anchors].double()) for x in acts[n]]
        for n in names
    }
    spans = {n: build[side[n]][1] for n in names}
    supports = {
        n: [support_labels(i, p, spans=spans[n]) for i, p in zip(itdas[n], probe[n], strict=True)]
        for n in names
    }
    codes = {
        n: [i.encode_sparse(p) for i, p in zip(itdas[n], probe[n], strict=True)] for n in names
    }

    # where each model reads the other's atoms: its own windows a little past the build's, so
    # they cover every text point of the other tokenizer's windows
    extra = {
        v: (
            zoo.load_tokens("train", len(build[v][0]) + 8, tokenizer=t, shuffle=False),
            zoo.load_token_spans("train", len(build[v][0]) + 8, tokenizer=t, shuffle=False),
        )
        for v, t in (("a", tok_a), ("b", tok_b))
    }

    def atoms_in(x: Any, src: str, dst: str) -> list[torch.Tensor]:
        """Model ``dst``'s activations (every layer) at ``x``'s atoms, carried over by text."""
        toks, where_spans = extra[side[dst]]
        where = labels_by_span(x.atom_labels, spans[src], where_spans)
        got = activations_at_labels(models[dst], toks, hooks_of(models[dst]), where)
        return [got[h].float() for h in hooks_of(models[dst])]

    in_b = {a: [atoms_in(x, a, name_b) for x in itdas[a]] for a in seeds}
    in_a = {a: [atoms_in(y, name_b, a) for y in itdas[name_b]] for a in seeds}
    matrices: dict[str, dict[tuple[str, str], torch.Tensor]] = {m: {} for m in CROSS_MEASURES}
    b = name_b
    for a in seeds:
        la, lb = len(itdas[a]), len(itdas[b])
        mats = {m: torch.zeros(la, lb) for m in CROSS_MEASURES[:3]}
        for i, j in itertools.product(range(la), range(lb)):
            x, y = itdas[a][i], itdas[b][j]
            mats["ITDA span Jaccard"][i, j] = span_jaccard(x, spans[a], y, spans[b])
            mats["ITDA transfer"][i, j] = 0.5 * (
                decomposition_transfer(x, probe[a][i], probe[b][j], in_b[a][i][j], code=codes[a][i])
                + decomposition_transfer(y, probe[b][j], probe[a][i], in_a[a][j][i], code=codes[b][j])
            )  # fmt: skip
            mats["ITDA probe support Jaccard"][i, j] = support_jaccard(
                supports[a][i], supports[b][j]
            )
        base, reverse = baseline_matrices(acts[a], acts[b], views[a], views[b], rel[a], rel[b])
        for m, mat in (mats | base).items():
            matrices[m][(a, b)] = mat
            matrices[m][(b, a)] = reverse.T if m == "linear regression R2" else mat.T
    accuracy = [
        {"measure": m, ACC: f"{layer_matching_accuracy(matrices[m]):.2f}"} for m in CROSS_MEASURES
    ]
    span = matrices["ITDA span Jaccard"][(seeds[0], b)]
    layers = [f"L{i}" for i in range(span.shape[0])]
    for measure, slug in (("ITDA span Jaccard", "span_jaccard"), ("ITDA transfer", "transfer")):
        if out is not None:
            heatmap(
                matrices[measure][(seeds[0], b)].tolist(),
                out / f"heatmap_cross_tokenizer_{slug}.png",
                rows=layers,
                cols=[f"L{j}" for j in range(span.shape[1])],
                title=f"{measure}: {seeds[0]} vs {b}",
                xlabel=b,
                ylabel=seeds[0],
            )
    atoms = {n: [it.cfg.d_sae for it in itdas[n]] for n in (seeds[0], b)}
    head = [f"{b} L{j} ({n} atoms)" for j, n in enumerate(atoms[b])]
    cols = [f"{seeds[0]} layer (atoms)", *head]
    return {
        "pairs": [f"{a} | {b}" for a in seeds],
        "accuracy": accuracy,
        "matrix": [[round(v, 3) for v in r] for r in span.tolist()],
        "diagonal_is_row_max": bool((span.argmax(1) == torch.arange(span.shape[0])).all()),
        "windows": build["windows"],
        "heldout_windows": held["windows"],
        "aligned_heldout_tokens": n_tok,
        "atoms": atoms,
        "columns": cols,
        "rows": [
            {
                cols[0]: f"L{i} ({atoms[seeds[0]][i]})",
                **{c: f"{v:.3f}" for c, v in zip(head, r, strict=True)},
            }
            for i, r in enumerate(span.tolist())
        ],
        "matrices": {
            m: {f"{x}|{y}": v.tolist() for (x, y), v in mm.items()} for m, mm in matrices.items()
        },
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
