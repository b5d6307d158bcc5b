"""The reference code's layer-matching protocol reproduced on the zoo, and what carries its result.

The reference (pleask/itda `layer_similarity.py`; see README "Model comparison") builds one
dictionary per layer with its *batch rule*: a start-up dictionary of the first batch's unique rows,
most frequent first, until it holds d_model atoms; then every token of a batch whose k-step matching
pursuit against the dictionary at the batch start falls below the threshold is appended (no
de-duplication, no masking of special tokens). It scores layers 1..n-1 by the Jaccard index of the
atom labels and counts every ordered pair of models *including each model with itself*.

Here: the zoo's seed families, the same windows in the same order, k = 8 and cos 0.85 (the
reference's tau = 0.0004 is cos 0.85 at d = 768; k = 8 at d = 128 is about the reference's k / d),
batches of 128 windows. Then one change at a time: the dictionary *size* alone as the similarity
(min / max: Jaccard's upper bound), the first batch's atoms removed before the Jaccard, no start-up
dictionary, batches of 32 windows, cos 0.9, k = 16, and our batch rule (in-batch near-duplicates
removed). Accuracy is given as the reference counts it and without self-pairs.

    python benchmarks/layer_matching.py --part reference   # full run (see benchmarks/README.md)
    python benchmarks/layer_matching_reference.py          # the same, this part alone
    python benchmarks/layer_matching_reference.py --quick --out bench_out/layer_matching_reference_q
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from typing import Any

import torch
from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import zoo
from itda_lens.activations import hook_activations
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.similarity import layer_matching_accuracy, set_jaccard

Labels = list[set[tuple[int, int]]]

REFERENCE: dict[str, Any] = {"batch": 128, "k": 8, "cos": 0.85, "startup": True, "dedup": False}
ABLATIONS: dict[str, dict[str, Any]] = {
    "no start-up dictionary": {"startup": False},
    "batches of 32 windows": {"batch": 32},
    "cos 0.9": {"cos": 0.9},
    "k = 16": {"k": 16},
    "in-batch duplicates removed (our batch rule)": {"dedup": True},
}


def startup_rows(x: torch.Tensor, need: int) -> torch.Tensor:
    """The reference's start-up: indices of the batch's unique rows, most frequent first (ties in
    ``torch.unique``'s order, by value, as the reference's unstable sort leaves them), ``need`` of them."""
    _, inverse, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((counts.shape[0],), x.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(x.shape[0]), "amin")
    return first[torch.sort(counts, descending=True, stable=True).indices[:need]]


def reference_build(
    model: Any, tokens: torch.Tensor, batch: int, k: int, cos: float, startup: bool, dedup: bool
) -> Labels:
    """Every layer's atom labels (window, position) under the reference's protocol."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    d = model.cfg.d_model
    cfg = BuildConfig(
        k=k, cos_threshold=cos, add_rule="batch", exclude_special_tokens=False,
        decision_dtype="float32",
    )  # fmt: skip
    builders = [ITDABuilder(d, cfg) for _ in hooks]
    for start in range(0, tokens.shape[0], batch):
        toks = tokens[start : start + batch]
        acts = hook_activations(model, toks, hooks, None)
        seq, pos = torch.meshgrid(
            torch.arange(start, start + toks.shape[0]), torch.arange(toks.shape[1]), indexing="ij"
        )
        labels, ids = torch.stack([seq, pos], -1).reshape(-1, 2), toks.reshape(-1)
        for h, b in zip(hooks, builders, strict=True):
            x = acts[h].reshape(-1, d).float()
            if startup and len(b.store) < d:
                r = startup_rows(x, d - len(b.store))
                b.store.add(x[r], labels[r], ids[r])
            if (
                dedup
            ):  # our batch rule: candidates judged at the batch start, near-duplicates dropped
                b.update(ActivationBatch(x, labels, ids, torch.ones(len(x), dtype=torch.bool)))
            else:  # the reference: every candidate is appended
                add = b.score(x).accept.nonzero().flatten()
                b.store.add(x[add], labels[add], ids[add])
    return [{(int(s), int(p)) for s, p in b.store.labels.tolist()} for b in builders]


def _size_ratio(a: set, b: set) -> float:
    return min(len(a), len(b)) / max(len(a), len(b), 1)


def accuracies(
    sets: dict[str, Labels], measure: Any, drop_before: int | None = None
) -> dict[str, float]:
    """Layer matching over layers 1..n-1 with and without self-pairs (``drop_before``: atoms
    from windows before it removed first)."""
    kept = {
        n: [{x for x in s if drop_before is None or x[0] >= drop_before} for s in v[1:]]
        for n, v in sets.items()
    }
    mats = {
        (a, b): torch.tensor([[measure(x, y) for y in kept[b]] for x in kept[a]])
        for a, b in itertools.product(kept, kept)
    }
    return {
        "with self-pairs (reference)": layer_matching_accuracy(mats, include_self=True),
        "without self-pairs": layer_matching_accuracy(mats),
    }


def add_options(parser: argparse.ArgumentParser) -> None:
    """This part's options (also taken by ``layer_matching.py --part reference``)."""
    parser.add_argument("--reference-windows", type=int, default=512)
    parser.add_argument("--reference-families", nargs="+", default=["8l128", "4l128"])


def run(args: argparse.Namespace) -> None:
    """The reproduction and its ablations; writes ``layer_matching_reference.json``."""
    t0 = time.perf_counter()
    windows = 64 if args.quick else args.reference_windows
    tokens = zoo.load_tokens("train", windows)
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {"windows": windows, "reference": REFERENCE, "families": {}}
    for family in args.reference_families:
        names = [n for n in zoo.list_models() if re.fullmatch(rf"kjv-{family}-s\d+", n)]
        names = names[:2] if args.quick else names
        if len(names) < 2:
            continue
        models = {n: zoo.load_model(n) for n in names}
        settings = {"reference protocol": REFERENCE} | {
            name: REFERENCE | change for name, change in ABLATIONS.items()
        }
        if args.quick:
            settings = dict(itertools.islice(settings.items(), 2))
        fam: dict[str, Any] = {}
        for setting, s in settings.items():
            t1 = time.perf_counter()
            batch = s["batch"] // 8 if args.quick else s["batch"]
            sets = {
                n: reference_build(m, tokens, batch, s["k"], s["cos"], s["startup"], s["dedup"])
                for n, m in models.items()
            }
            atoms = [len(x) for v in sets.values() for x in v]
            first = sum(sum(1 for lab in x if lab[0] < batch) for v in sets.values() for x in v)
            measured = {setting: accuracies(sets, set_jaccard)}
            if setting == "reference protocol":
                measured["size alone (min / max atoms)"] = accuracies(sets, _size_ratio)
                measured["first batch's atoms removed"] = accuracies(sets, set_jaccard, batch)
            for label, acc in measured.items():
                rows.append(
                    {
                        "family": f"{family} ({len(names)} seeds)",
                        "setting": label,
                        **{k: f"{v:.2f}" for k, v in acc.items()},
                        "atoms per layer": f"{min(atoms)}-{max(atoms)}",
                        "from the first batch": f"{first / sum(atoms):.1%}",
                    }
                )
                print(rows[-1], flush=True)
            fam[setting] = {
                "accuracy": measured,
                "atoms": {n: [len(x) for x in v] for n, v in sets.items()},
                "first_batch_share": first / sum(atoms),
                "seconds": time.perf_counter() - t1,
            }
        data["families"][family] = fam
    cols = list(rows[0])
    print(table(rows, cols))
    record(
        "layer_matching_reference",
        args,
        {"reference": table_spec(rows, cols)},
        data,
        time.perf_counter() - t0,
    )


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/layer_matching_reference")
    add_options(parser)
    args = parser.parse_args()
    prepare(args)
    run(args)


if __name__ == "__main__":
    main()
