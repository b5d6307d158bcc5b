"""ITDA build throughput on zoo models, split into model forward and dictionary work: the exact
sequential rule (the default) next to the reference code's batch rule on the same stream (same
model, hooks, k, threshold or target width), plus how each rule's dictionary size depends on the
batch size. Dictionary work is the build pass's rule time; a sized build (the demo's) also runs
the threshold search, shown separately.

    python benchmarks/build.py            # full run (~2 minutes)
    python benchmarks/build.py --quick    # reduced run, same code and tables
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import bench_parser, fmt_bytes, measure, prepare, record, table, table_spec

from itda_lens import ITDA, BuildConfig, build_itda, zoo
from itda_lens.demo import DEMO_CONFIG
from itda_lens.pursuit import matching_pursuit

MODEL = zoo.DEFAULT_MODEL
#: (name, layers, build config, training windows): the demo's settings first
SETTINGS = [
    ("demo (layers 1+2, k=20, 1024 atoms)", [1, 2], DEMO_CONFIG, 512),
    ("k=40, cos 0.8", [2], BuildConfig(k=40, cos_threshold=0.8), 1024),
    ("k=16, cos 0.9", [2], BuildConfig(k=16, cos_threshold=0.9), 1024),
]
BATCH_SIZES = [1, 4, 32, 128]  # sequences of 128 tokens per forward pass


def run(model: Any, tokens: torch.Tensor, hooks: list[str], cfg: BuildConfig) -> dict:
    m = measure(lambda: build_itda(model, tokens, hooks, cfg, progress=False))
    itdas: dict[str, ITDA] = m.result
    records = [it.require_build_record() for it in itdas.values()]
    fwd = records[0].forward_seconds
    dictionary = sum(r.dictionary_seconds for r in records)
    n_tok = records[0].tokens_seen
    searches = [r.search for r in records]
    return {
        "rule": cfg.add_rule,
        "search_s": sum(s.seconds for s in searches if s) if all(searches) else None,
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
    settings = SETTINGS
    if args.quick:
        settings = [
            (n, ls, c.replace(target_atoms=c.target_atoms and 256), 64)
            for n, ls, c, _ in SETTINGS[:2]
        ]
    rows: list[dict] = []
    for name, layers, cfg, n_seq in settings:
        tokens = zoo.load_tokens("train", n_seq)
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
        for rule in ("exact", "batch"):
            r = run(model, tokens, hooks, cfg.replace(add_rule=rule, batch_size=32))
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
            "threshold search s": "-" if r["search_s"] is None else f"{r['search_s']:.1f}",
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
    name, layers, cfg, _ = SETTINGS[2]
    tokens = zoo.load_tokens("train", 16 if args.quick else 256)
    hook = f"blocks.{layers[0]}.hook_resid_post"
    sizes = BATCH_SIZES[:3] if args.quick else BATCH_SIZES
    by_batch: list[dict] = []
    for rule in ("exact", "batch"):
        labels = []
        for bs in sizes:
            it = build_itda(
                model, tokens, hook, cfg.replace(batch_size=bs, add_rule=rule), progress=False
            )[hook]
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
