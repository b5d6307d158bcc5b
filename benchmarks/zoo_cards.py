"""Print the zoo's cards as a markdown table: held-out loss against the add-one unigram baseline.

python benchmarks/zoo_cards.py
"""

from __future__ import annotations

from itda_lens import zoo


def main() -> None:
    print(
        "| model | tokenizer | layers x d_model | params | tokens seen | epochs | train loss | held-out loss | unigram held-out | train time |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in zoo.list_models(include_checkpoints=True):
        c = zoo.model_card(name)
        t = c["train_config"]
        model = zoo.load_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {c['tokenizer']} | {t['n_layers']} x {t['d_model']} | {params / 1e6:.2f} M | "
            f"{c['tokens_seen'] / 1e6:.2f} M | {c['epochs']} | {c['train_loss_ema']:.3f} | "
            f"**{c['heldout_loss']:.3f}** | {c['unigram_heldout_loss']:.3f} | {c['train_seconds'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
