"""Where does ITDA's greedy selection beat randomly sampled activations? A width sweep.

At 8x-32x d_model the random-activation control matches ITDA everywhere (``vs_sae.py``). Here the
dictionary is made small (1/8 to 8 x d_model atoms): the greedy build capped at n atoms (cos_threshold
0.9, the paper's rule) against n randomly sampled training activations and n random *distinct-token*
activations, all encoded with the same signed MP at k steps; held-out FVU (fraction of variance
unexplained) on activations of held-out text. Also printed: how many distinct tokens the atoms come
from (random sampling over-represents frequent tokens).

    python benchmarks/greedy_vs_random.py --out bench_out/greedy_vs_random          # ~1 min, 2 cores
    python benchmarks/greedy_vs_random.py --quick --out bench_out/greedy_vs_random_q
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from _common import bench_parser, prepare, table

from itda_lens import ITDA, build_itda_from_activations, zoo
from itda_lens.analysis import fvu
from itda_lens.plots import line_plot
from itda_lens.sae_training import collect_activations

MODEL, HOOK = "kjv-4l128-s0", "blocks.2.hook_resid_post"


def mp_fvu(itda: ITDA, x: torch.Tensor) -> float:
    with torch.no_grad():
        return fvu(x, itda.decode_sparse(itda.encode_sparse(x)))


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/greedy_vs_random")
    parser.add_argument("--seeds", type=int, default=3, help="random draws per control")
    args = parser.parse_args()
    if args.quick:
        mults, ks, windows, heldout_n = (0.25, 1.0), (4,), 64, 8
    else:
        mults, ks, windows, heldout_n = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0), (4, 16), 512, 64
    out = prepare(args)
    t0 = time.perf_counter()
    model = zoo.load_model(MODEL)
    d = model.cfg.d_model
    train = collect_activations(model, zoo.load_tokens("train", windows), HOOK)
    held = collect_activations(model, zoo.load_tokens("heldout", heldout_n), HOOK).acts
    first_of_token: dict[int, int] = {}
    for i, t in enumerate(train.token_ids.tolist()):
        first_of_token.setdefault(t, i)
    distinct_rows = torch.tensor(list(first_of_token.values()))
    rows: list[dict[str, Any]] = []
    for k in ks:
        for mult in mults:
            n = int(mult * d)
            if n < k:
                continue
            greedy = build_itda_from_activations(
                [train.acts[s : s + 1024] for s in range(0, len(train.acts), 1024)],
                k=k,
                cos_threshold=0.9,
                max_atoms=n,
                progress=False,
            )
            atoms_rows = greedy.atom_labels[:, 0]  # row in the activation stream
            result = {
                "k": k,
                "atoms": n,
                "greedy FVU": mp_fvu(greedy, held),
                "greedy tokens": len(set(train.token_ids[atoms_rows].tolist())),
            }
            rand, distinct, rand_tokens = [], [], []
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)
                pick = torch.randperm(len(train.acts), generator=g)[:n]
                rand.append(mp_fvu(ITDA.from_atoms(train.acts[pick], k), held))
                rand_tokens.append(len(set(train.token_ids[pick].tolist())))
                dpick = distinct_rows[torch.randperm(len(distinct_rows), generator=g)[:n]]
                distinct.append(mp_fvu(ITDA.from_atoms(train.acts[dpick], k), held))
            result["random FVU"] = sum(rand) / len(rand)
            result["random FVU spread"] = max(rand) - min(rand)
            result["random tokens"] = sum(rand_tokens) / len(rand_tokens)
            result["distinct-token FVU"] = sum(distinct) / len(distinct)
            result["greedy / random"] = result["greedy FVU"] / result["random FVU"]
            rows.append(result)
            print(result, flush=True)
    shown = [
        {
            **r,
            **{
                c: f"{r[c]:.3f}"
                for c in (
                    "greedy FVU",
                    "random FVU",
                    "random FVU spread",
                    "distinct-token FVU",
                    "greedy / random",
                )
            },
            "random tokens": f"{r['random tokens']:.0f}",
        }
        for r in rows
    ]
    print(
        table(
            shown,
            [
                "k",
                "atoms",
                "greedy FVU",
                "random FVU",
                "random FVU spread",
                "distinct-token FVU",
                "greedy / random",
                "greedy tokens",
                "random tokens",
            ],
        )
    )
    line_plot(
        {
            f"{label}, k={k}": (
                [r["atoms"] for r in rows if r["k"] == k],
                [r[col] for r in rows if r["k"] == k],
            )
            for k in ks
            for label, col in (("greedy", "greedy FVU"), ("random", "random FVU"))
        },
        out / "fvu_vs_atoms.png",
        xlabel="atoms",
        ylabel="held-out FVU",
        title=f"{MODEL} {HOOK}: greedy ITDA vs random activations",
        logx=True,
    )
    seconds = time.perf_counter() - t0
    (out / "greedy_vs_random.json").write_text(
        json.dumps({"rows": rows, "seconds": seconds}, indent=2)
    )
    print(f"\nwrote {out / 'greedy_vs_random.json'} and fvu_vs_atoms.png; total {seconds:.0f}s")


if __name__ == "__main__":
    main()
