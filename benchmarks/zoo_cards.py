"""The zoo's cards as a table: held-out loss against the add-one unigram baseline.

python benchmarks/zoo_cards.py
"""

from __future__ import annotations

import time

from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import zoo


def main() -> None:
    args = bench_parser(__doc__, "bench_out/zoo_cards").parse_args()
    prepare(args)
    t0 = time.perf_counter()
    rows = []
    for name in zoo.list_models(include_checkpoints=True):
        c = zoo.model_card(name)
        t = c["train_config"]
        params = sum(p.numel() for p in zoo.load_model(name).parameters())
        rows.append(
            {
                "model": name,
                "tokenizer": c["tokenizer"],
                "layers x d_model": f"{t['n_layers']} x {t['d_model']}",
                "params": f"{params / 1e6:.2f} M",
                "tokens seen": f"{c['tokens_seen'] / 1e6:.2f} M",
                "epochs": c["epochs"],
                "train loss": f"{c['train_loss_ema']:.3f}",
                "held-out loss": f"**{c['heldout_loss']:.3f}**",
                "unigram held-out": f"{c['unigram_heldout_loss']:.3f}",
                "train time": f"{c['train_seconds'] / 60:.1f} min",
            }
        )
    cols = list(rows[0])
    print(table(rows, cols))
    record(
        "zoo_cards",
        args,
        {"cards": table_spec(rows, cols)},
        {"cards": rows},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
