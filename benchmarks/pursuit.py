"""Pursuit speed and memory, side by side in one process.

For each (atoms n, width d, k): the literal reference MP (the paper's Algorithm 2: k dense matmuls,
dense codes), our MP, our OMP, scikit-learn's ``orthogonal_mp_gram`` (parity and speed, on a subset
of tokens because it loops per token in Python), and the floor: one matmul of the tokens against the
dictionary. Prints tokens/s, peak extra memory and the ratios ours/reference and ours/floor.

Data: atoms and tokens are drawn from one anisotropic Gaussian (power-law spectrum, like real
residual streams) — ``--data gaussian`` uses isotropic data instead (the worst case for row caching).

    python benchmarks/pursuit.py            # full run (a few minutes)
    python benchmarks/pursuit.py --quick    # reduced run (< 2 minutes), same code and table
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    bench_parser,
    fmt_bytes,
    matmul_gflops,
    measure,
    prepare,
    record,
    table,
    table_spec,
)
from sklearn.linear_model import orthogonal_mp_gram

from itda_lens.budget import memory_budget
from itda_lens.pursuit import (
    matching_pursuit,
    orthogonal_matching_pursuit,
    plan_rows,
    reference_matching_pursuit,
)

CONFIGS = [(4096, 128, 40), (16384, 512, 40), (65536, 768, 40)]


def sample(n: int, d: int, t: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = (
        torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
        if kind == "anisotropic"
        else torch.ones(d)
    )
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    mix = basis * scale
    atoms = F.normalize(torch.randn(n, d, generator=g) @ mix.T, dim=1)
    x = torch.randn(t, d, generator=g) @ mix.T * 10
    return atoms, x


def run_config(n: int, d: int, k: int, tokens: int, sk_tokens: int, data: str, rate: float) -> dict:
    atoms, x = sample(n, d, tokens, data)
    row: dict = {"n": n, "d": d, "k": k, "tokens": tokens}
    floor = measure(lambda: x @ atoms.T)
    row["floor tok/s (measured / at peak rate)"] = (
        f"{tokens / floor.seconds:,.0f} / {tokens / (2 * tokens * n * d / rate / 1e9):,.0f}"
    )
    ref = measure(lambda: reference_matching_pursuit(x, atoms, k))
    build = measure(lambda: plan_rows(atoms, tokens, k))
    gram = build.result
    row["Gram build s"] = f"{build.seconds:.2f}" + ("" if gram.full else " (row cache)")
    sk_fits = n * n * 8 <= memory_budget()  # scikit-learn needs the float64 Gram
    ours = measure(lambda: matching_pursuit(x, atoms, k, gram=gram))
    omp = measure(lambda: orthogonal_matching_pursuit(x, atoms, k, gram=gram))
    per_token = (ours.result.to_dense(n) - ref.result).abs().amax(dim=1) / x.norm(dim=1)
    agree = float((per_token < 1e-4).float().mean())
    row.update(
        {
            "reference tok/s": f"{tokens / ref.seconds:,.0f}",
            "reference peak": fmt_bytes(ref.peak_extra_bytes),
            "MP tok/s": f"{tokens / ours.seconds:,.0f}",
            "MP peak": fmt_bytes(ours.peak_extra_bytes),
            "MP / reference": f"{ref.seconds / ours.seconds:.1f}x",
            "MP / floor": f"{ours.seconds / floor.seconds:.1f}x slower",
            "OMP tok/s": f"{tokens / omp.seconds:,.0f}",
            "OMP peak": fmt_bytes(omp.peak_extra_bytes),
            "MP = reference (tokens, codes within 1e-4 of norm x)": f"{agree:.1%}",
        }
    )
    if sk_fits:
        g64 = (atoms.double() @ atoms.double().T).numpy()
        xs = x[:sk_tokens]
        xy = (atoms.double() @ xs.double().T).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sk = measure(lambda: orthogonal_mp_gram(g64, xy, n_nonzero_coefs=k))
        mine = measure(lambda: orthogonal_matching_pursuit(xs, atoms, k, gram=gram))
        diff = np.abs(mine.result.to_dense(n).double().numpy() - sk.result.T).max() / float(
            xs.norm(dim=1).max()
        )
        row.update(
            {
                "sklearn OMP tok/s": f"{sk_tokens / sk.seconds:,.0f}",
                "OMP / sklearn": f"{sk.seconds / mine.seconds:.1f}x",
                "OMP-vs-sklearn max abs diff / max norm x": f"{diff:.1e}",
            }
        )
    else:
        row.update({"sklearn OMP tok/s": "n/a (needs the 34 GB Gram)", "OMP / sklearn": "n/a"})
    return row


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/pursuit")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--data", choices=["anisotropic", "gaussian"], default="anisotropic")
    args = parser.parse_args()
    prepare(args)
    t0 = time.perf_counter()
    tokens = args.tokens or (64 if args.quick else 2048)
    sk_tokens = 16 if args.quick else 256
    # compile (or load from numba's on-disk cache) the fused kernel before anything is timed
    warm = F.normalize(torch.randn(16, 8), dim=1)
    matching_pursuit(torch.randn(4, 8), warm, 2)
    rate = matmul_gflops()
    print(
        f"fp32 matmul rate on this machine: {rate:.0f} GFLOP/s ({args.threads} threads); data: {args.data}; {tokens} tokens"
    )
    rows = [run_config(n, d, k, tokens, sk_tokens, args.data, rate) for n, d, k in CONFIGS]
    cols = [
        "n",
        "d",
        "k",
        "reference tok/s",
        "MP tok/s",
        "MP / reference",
        "floor tok/s (measured / at peak rate)",
        "MP / floor",
        "OMP tok/s",
        "sklearn OMP tok/s",
        "OMP / sklearn",
    ]
    mem_cols = [
        "n",
        "d",
        "reference peak",
        "MP peak",
        "OMP peak",
        "Gram build s",
        "MP = reference (tokens, codes within 1e-4 of norm x)",
        "OMP-vs-sklearn max abs diff / max norm x",
    ]
    print(table(rows, cols))
    print()
    print(table(rows, mem_cols))
    record(
        "pursuit",
        args,
        {"speed": table_spec(rows, cols), "memory": table_spec(rows, mem_cols)},
        {"gflops": rate, "tokens": tokens, "data": args.data, "rows": rows},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
