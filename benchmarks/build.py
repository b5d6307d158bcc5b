"""ITDA build throughput on zoo models, split into model forward and dictionary work: the exact
sequential rule (the default) next to the reference code's batch rule on the same stream (same
model, hooks, k, threshold), plus how each rule's dictionary size depends on the batch size.

    python benchmarks/build.py            # full run (~2 minutes)
    python benchmarks/build.py --quick    # reduced run, same code and tables
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import bench_parser, fmt_bytes, measure, prepare, record, table, table_spec

from itda_lens import ITDA, build_itda, zoo
from itda_lens.pursuit import matching_pursuit

MODEL = zoo.DEFAULT_MODEL
#: (name, layers, k, cos_threshold, training windows): the demo's settings first
SETTINGS = [
    ("demo (layers 1+2, k=20, cos 0.8)", [1, 2], 20, 0.8, 512),
    ("k=40, cos 0.8", [2], 40, 0.8, 1024),
    ("k=16, cos 0.9", [2], 16, 0.9, 1024),
]
BATCH_SIZES = [1, 4, 32, 128]  # sequences of 128 tokens per forward pass


def run(model: Any, tokens: torch.Tensor, hooks: list[str], rule: str, **kw: Any) -> dict:
    m = measure(lambda: build_itda(model, tokens, hooks, add_rule=rule, progress=False, **kw))
    itdas: dict[str, ITDA] = m.result
    metas = [it.cfg.metadata.itda_builder for it in itdas.values()]
    fwd = metas[0]["forward_seconds"]
    dictionary = sum(meta["dictionary_seconds"] for meta in metas)
    n_tok = metas[0]["tokens_seen"]
    return {
        "rule": rule,
        "tokens": n_tok,
        "atoms": "+".join(str(it.cfg.d_sae) for it in itdas.values()),
        "wall_s": m.seconds,
        "tok_per_s": n_tok / m.seconds,
        "forward_s": fwd,
        "dictionary_s": dictionary,
        "dictionary_over_forward": dictionary / fwd,
        "peak_extra_bytes": m.peak_extra_bytes,
        "labels": [it.atom_labels.tolist() for it in itdas.values()],
    }


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/build")
    args = parser.parse_args()
    prepare(args)
    t0 = time.perf_counter()
    warm = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    for dt in (torch.float32, torch.float64):  # compile the fused kernel before timing
        matching_pursuit(torch.randn(4, 8, dtype=dt), warm.to(dt), 2, gram=(warm @ warm.T).to(dt))
    model = zoo.load_model(MODEL)
    settings = [(n, ls, k, c, 64) for n, ls, k, c, _ in SETTINGS[:2]] if args.quick else SETTINGS
    rows: list[dict] = []
    for name, layers, k, cos, n_seq in settings:
        tokens = zoo.load_tokens("train", n_seq)
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
        for rule in ("exact", "batch"):
            r = run(model, tokens, hooks, rule, k=k, cos_threshold=cos, batch_size=32)
            rows.append({"setting": name, **r})
            print({k_: v for k_, v in rows[-1].items() if k_ != "labels"}, flush=True)
    shown = [
        {
            **r,
            "tokens": f"{r['tokens']:,}",
            "wall s": f"{r['wall_s']:.1f}",
            "tok/s": f"{r['tok_per_s']:,.0f}",
            "forward s": f"{r['forward_s']:.2f}",
            "dictionary s": f"{r['dictionary_s']:.2f}",
            "dictionary / forward": f"{r['dictionary_over_forward']:.2f}",
            "peak extra": fmt_bytes(r["peak_extra_bytes"]),
        }
        for r in rows
    ]
    cols = [
        "setting",
        "rule",
        "tokens",
        "atoms",
        "wall s",
        "tok/s",
        "forward s",
        "dictionary s",
        "dictionary / forward",
        "peak extra",
    ]
    rules = table_spec(shown, cols)
    print(table(shown, cols))

    # how the dictionary depends on the batch size under each rule
    name, layers, k, cos, _ = SETTINGS[2]
    tokens = zoo.load_tokens("train", 16 if args.quick else 256)
    hook = f"blocks.{layers[0]}.hook_resid_post"
    sizes = BATCH_SIZES[:3] if args.quick else BATCH_SIZES
    by_batch: list[dict] = []
    for rule in ("exact", "batch"):
        labels = []
        for bs in sizes:
            it = build_itda(
                model,
                tokens,
                hook,
                k=k,
                cos_threshold=cos,
                batch_size=bs,
                add_rule=rule,
                progress=False,
            )
            labels.append(it.atom_labels)
            first = int((it.atom_labels[:, 0] < bs).sum())
            by_batch.append(
                {
                    "rule": rule,
                    "batch (tokens)": bs * tokens.shape[1],
                    "atoms": it.cfg.d_sae,
                    "atoms from the first batch": first,
                    "same atoms, labels and order as batch 1": torch.equal(
                        labels[0], it.atom_labels
                    ),
                }
            )
    batch_cols = [
        "rule",
        "batch (tokens)",
        "atoms",
        "atoms from the first batch",
        "same atoms, labels and order as batch 1",
    ]
    print(f"\n{name} at {hook}, {tokens.numel():,} tokens:")
    print(table(by_batch, batch_cols))
    exact_same = all(
        r["same atoms, labels and order as batch 1"] for r in by_batch if r["rule"] == "exact"
    )
    print(f"exact rule: same dictionary at every batch size: {exact_same}")
    for r in rows:
        r.pop("labels")
    record(
        "build",
        args,
        {"rules": rules, "batch_size": table_spec(by_batch, batch_cols)},
        {"model": MODEL, "rows": rows, "by_batch": by_batch, "exact_invariant": exact_same},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
