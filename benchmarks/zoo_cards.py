"""The zoo's cards as tables: held-out loss against the add-one unigram baseline, and the
fine-tunes (for model diffing) next to their base on the same held-out text.

python benchmarks/zoo_cards.py
"""

from __future__ import annotations

import time

from _common import bench_parser, prepare, record, table, table_spec

from itda_lens import zoo


def _pair(base: dict, card: dict, key: str) -> str:
    return f"{base[key]:.3f} -> **{card[key]:.3f}**"


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
    tunes = []
    for name in zoo.list_models():
        c = zoo.model_card(name)
        if "finetuned_from" not in c:
            continue
        v, base = c["train_config"]["variant"], c["base_losses"]
        tunes.append(
            {
                "fine-tune": name,
                "from": c["finetuned_from"],
                "trained on": f"kjv:train:{v}",
                "tokens seen": f"{c['tokens_seen'] / 1e6:.2f} M",
                "epochs of it": c["epochs"],
                "held-out loss, all books": _pair(base, c, "heldout_loss"),
                "held-out loss, its variant": _pair(base, c, f"heldout_loss_{v}"),
                "inserted tokens only": _pair(base, c, "heldout_loss_marked")
                if "heldout_loss_marked" in c
                else "",
            }
        )
    tune_cols = list(tunes[0]) if tunes else []
    if tunes:
        print(table(tunes, tune_cols))
    record(
        "zoo_cards",
        args,
        {"cards": table_spec(rows, cols), "finetunes": table_spec(tunes, tune_cols)},
        {"cards": rows, "finetunes": tunes},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
