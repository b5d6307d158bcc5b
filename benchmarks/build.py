"""End-to-end ITDA build throughput on a zoo model, split into model forward and dictionary work:
our builder (pursuit engine, incremental Gram) against the same builder with the literal reference
pursuit (k dense matmuls per batch, dense codes), plus peak memory. Both must end with the same
dictionary.

    python benchmarks/build.py            # full run
    python benchmarks/build.py --quick    # reduced run (< 2 minutes), same code and table
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from _common import bench_parser, fmt_bytes, measure, table

from itda_lens import build_itda, zoo
from itda_lens.builder import ITDABuilder
from itda_lens.pursuit import matching_pursuit, reference_matching_pursuit


@contextmanager
def literal_pursuit() -> Iterator[None]:
    """Swap the builder's reconstruction for the paper's Algorithm 2 (dense codes @ atoms)."""
    original = ITDABuilder._reconstruct

    def literal(self: ITDABuilder, x: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
        return reference_matching_pursuit(x, atoms, self.settings.k) @ atoms

    ITDABuilder._reconstruct = literal  # type: ignore[method-assign]
    try:
        yield
    finally:
        ITDABuilder._reconstruct = original  # type: ignore[method-assign]


def run(label: str, model, tokens: torch.Tensor, hook: str, k: int, threshold: float) -> dict:
    m = measure(
        lambda: build_itda(model, tokens, hook, k=k, cos_threshold=threshold, progress=False)
    )
    meta = m.result.cfg.metadata.itda_builder
    n_tok = meta["tokens_seen"]
    return {
        "builder": label,
        "tokens": f"{n_tok:,}",
        "atoms": m.result.cfg.d_sae,
        "wall s": f"{m.seconds:.1f}",
        "tok/s": f"{n_tok / m.seconds:,.0f}",
        "forward s": f"{meta['forward_seconds']:.1f}",
        "dictionary s": f"{meta['dictionary_seconds']:.1f}",
        "dictionary / forward": f"{meta['dictionary_seconds'] / meta['forward_seconds']:.2f}",
        "peak extra": fmt_bytes(m.peak_extra_bytes),
        "_itda": m.result,
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL)
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--cos-threshold", type=float, default=0.8)
    parser.add_argument("--n-seq", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warm = torch.nn.functional.normalize(
        torch.randn(16, 8), dim=1
    )  # JIT-compile the fused kernel first
    matching_pursuit(torch.randn(4, 8), warm, 2, gram=warm @ warm.T)
    model = zoo.load_model(args.model)
    n_seq = args.n_seq or (64 if args.quick else 1024)
    tokens = zoo.load_tokens("train", n_seq, tokenizer=zoo.model_card(args.model)["tokenizer"])
    print(
        f"{args.model} at {args.hook}, k={args.k}, cos_threshold={args.cos_threshold}, {tokens.numel():,} tokens"
    )
    ours = run("itda_lens (Gram-space MP)", model, tokens, args.hook, args.k, args.cos_threshold)
    with literal_pursuit():
        ref = run("same builder, literal MP", model, tokens, args.hook, args.k, args.cos_threshold)
    same = torch.equal(ours["_itda"].atom_labels, ref["_itda"].atom_labels)
    rows = [ours, ref]
    print(
        table(
            rows,
            [
                "builder",
                "tokens",
                "atoms",
                "wall s",
                "tok/s",
                "forward s",
                "dictionary s",
                "dictionary / forward",
                "peak extra",
            ],
        )
    )
    d_ours, d_ref = (float(r["dictionary s"]) for r in rows)
    print(
        f"dictionary work: ours {d_ref / max(d_ours, 1e-9):.1f}x faster than literal; same dictionary: {same}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=2
            )


if __name__ == "__main__":
    main()
