"""ITDA at the sizes users work at: encoding and building with 4k-131k atoms at d = 768 and 2,048
(k = 40), side by side in one process with the literal algorithm and the one-GEMM floor.

* **Encode** (the user path: ``ITDA.from_atoms`` + ``encode_sparse``, Gram rows planned from the
  memory budget): tokens/s in steady state, against the paper's literal Algorithm 2 (k dense
  matmuls, on a subset of the tokens) and the floor (one matmul of the tokens against the atoms);
  the first call's planning (the int16 Gram rows: all of them, or a cache) timed apart; peak
  extra memory of plan + encode; supports compared with the literal algorithm.
* **Build** (the exact rule, ``max_atoms = N``): tokens/s and peak extra memory while the
  dictionary fills; each build is capped at ``--build-seconds`` of streaming, checked between
  1,024-token batches (the row says how far it got). Plus the goal run: 32,768 atoms over 262,144
  activations. Results are written after each section, so a run cut short keeps what it measured.
* **GPU path** (the exact rule's torch path, what a CUDA device runs, timed on this CPU): the
  sequential steps and torch ops (about one kernel launch each on a GPU) per 1,000 tokens, on a
  segment read after the kernel built the dictionary halfway, next to the batch rule's.

Data: activation-like synthetic vectors (an anisotropic Gaussian with a power-law spectrum, as in
``pursuit.py``) and, where the zoo allows, real activations (``kjv-6l160-s0``, layer 3, d = 160).

    python benchmarks/scale.py                       # full run (about an hour on 2 cores)
    python benchmarks/scale.py --quick               # reduced run, same code and tables
    python benchmarks/scale.py --device cuda         # unchanged on a CUDA machine
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from _common import bench_parser, fmt_bytes, measure, prepare, record, table, table_spec
from torch.utils._python_dispatch import TorchDispatchMode

from itda_lens import ITDA, BuildConfig, ITDABuilder, build_itda_from_activations, zoo
from itda_lens.activations import collect_activations
from itda_lens.budget import memory_budget, set_memory_budget
from itda_lens.builder import ActivationBatch
from itda_lens.gram import GramRows
from itda_lens.pursuit import PursuitStats, matching_pursuit, reference_matching_pursuit

K = 40
SIZES = [4096, 16384, 32768, 65536, 131072]
DIMS = [768, 2048]
ZOO = ("kjv-6l160-s0", "blocks.3.hook_resid_post")
BUILD_COS = 0.85  # fills the dictionary from about N tokens of the synthetic stream (d = 768)
GOAL = (32768, 262144, 0.825)  # atoms, activations, cos: the build the issue sets a goal for


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched (about one kernel launch each on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def mixer(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    return basis * torch.arange(1, d + 1, dtype=torch.float32) ** -0.5


def synthetic(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ mixer(d).T * 10).to(device)


def stream(
    d: int, total: int, deadline: float, device: str, batch: int = 1024
) -> Iterator[torch.Tensor]:
    """Synthetic activations in batches (seeded per batch), stopping at ``total`` or ``deadline``."""
    for i, start in enumerate(range(0, total, batch)):
        if time.perf_counter() > deadline:
            return
        yield synthetic(min(batch, total - start), d, 1000 + i, device)


def zoo_activations(n: int, device: str) -> torch.Tensor:
    model = zoo.load_model(ZOO[0])
    toks = zoo.load_tokens("train", None)
    seqs = min(toks.shape[0], n // 120 + 1)
    acts = collect_activations(model, toks[:seqs], ZOO[1], batch_size=64).acts
    g = torch.Generator().manual_seed(0)
    return acts[torch.randperm(acts.shape[0], generator=g)].to(device)


def encode_row(
    data: str, atoms: torch.Tensor, x: torch.Tensor, n_literal: int, device: str
) -> dict[str, Any]:
    n, d = atoms.shape
    itda = ITDA.from_atoms(atoms, K, device=device)
    plan = measure(lambda: itda.encode_sparse(x[:64]))  # the first call plans the Gram rows
    rows = itda.gram_rows()
    stats = PursuitStats()
    enc = measure(lambda: matching_pursuit(x, itda.W_dec.detach(), K, gram=rows, stats=stats))
    lit = measure(lambda: reference_matching_pursuit(x[:n_literal], atoms, K))
    floor = measure(lambda: x @ atoms.T)
    # the machine's speed drifts: time the literal algorithm again after ours, take the mean
    again = measure(lambda: reference_matching_pursuit(x[:n_literal], atoms, K))
    lit.seconds = (lit.seconds + again.seconds) / 2
    # codes equal the literal algorithm's (dense, slots summed) within 1e-4 of |x|, token by token
    gap = (enc.result.to_dense(n)[:n_literal] - lit.result).abs().amax(dim=1)
    same = float((gap <= 1e-4 * x[:n_literal].norm(dim=1)).float().mean())
    tok_s = x.shape[0] / enc.seconds
    lit_s = n_literal / lit.seconds
    floor_s = x.shape[0] / floor.seconds
    return {
        "data": data,
        "d": d,
        "atoms": n,
        "tokens": x.shape[0],
        "rows": "full int16"
        if rows is not None and rows.full
        else f"cache of {rows.capacity_rows:,}"
        if rows is not None
        else "none",
        "plan_s": plan.seconds,
        "encode_tok_s": tok_s,
        "literal_tok_s": lit_s,
        "floor_tok_s": floor_s,
        "x_literal": tok_s / lit_s,
        "x_floor": floor_s / tok_s,
        "peak_extra_bytes": max(plan.peak_extra_bytes, enc.peak_extra_bytes),
        "literal_peak_bytes": lit.peak_extra_bytes,
        "rows_computed_per_token": stats.rows_computed / x.shape[0],
        "candidates_per_step": stats.candidates / max(1, stats.steps),
        "same_codes_as_literal": same,
    }


def build_row(
    n: int, d: int, total: int, cos: float, seconds: float, device: str
) -> dict[str, Any]:
    deadline = time.perf_counter() + seconds
    m = measure(
        lambda: build_itda_from_activations(
            stream(d, total, deadline, device),
            k=K,
            cos_threshold=cos,
            max_atoms=n,
            device=device,
            progress=False,
        )
    )
    record = m.result.require_build_record()
    return {
        "d": d,
        "max_atoms": n,
        "cos": cos,
        "atoms": m.result.cfg.d_sae,
        "tokens_read": record.tokens_seen,
        "stop": record.stop_reason or ("time cap" if record.tokens_seen < total else "end"),
        "wall_s": m.seconds,
        "build_tok_s": record.tokens_seen / m.seconds,
        "peak_extra_bytes": m.peak_extra_bytes,
    }


def gpu_path_row(n: int, d: int, device: str, segment: int, fill_seconds: float) -> dict[str, Any]:
    """Steps and torch ops per 1,000 tokens of the exact rule's torch path and the batch rule,
    on a segment read after the kernel filled the dictionary to half of ``n`` (or read as much
    of the stream as the build rows do, or ran out of ``fill_seconds``)."""
    cfg = BuildConfig(k=K, cos_threshold=BUILD_COS, max_atoms=n)
    b = ITDABuilder(d, cfg, device=device)
    i, deadline = 0, time.perf_counter() + fill_seconds
    # half full, or as far as the build rows read, or the time cap
    while len(b.store) < n // 2 and i * 512 < 4 * n and time.perf_counter() < deadline:
        b.update(batch_of(synthetic(512, d, 1000 + i, device)))
        i += 1
    seg = synthetic(segment, d, 5000, device)
    row: dict[str, Any] = {"d": d, "atoms_at_start": len(b.store)}
    for rule in ("exact", "batch"):
        c = ITDABuilder(d, cfg.replace(add_rule=rule), device=device, backend="torch")
        c.store = b.store if rule == "exact" else copy_store(b, c)
        c.tokens_seen = b.tokens_seen
        counter = OpCounter()
        t0 = time.perf_counter()
        with counter:
            for part in seg.split(4096):
                c.update(batch_of(part))
        secs = time.perf_counter() - t0
        per = 1000 / segment
        row[f"{rule}_steps_per_1k"] = c.steps * per
        row[f"{rule}_ops_per_1k"] = sum(counter.ops.values()) * per
        row[f"{rule}_added"] = len(c.store) - row["atoms_at_start"]
        row[f"{rule}_tok_s"] = segment / secs
    return row


def batch_of(x: torch.Tensor) -> ActivationBatch:
    n = x.shape[0]
    return ActivationBatch(
        x,
        torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1),
        torch.zeros(n, dtype=torch.long),
        torch.ones(n, dtype=torch.bool),
    )


def copy_store(src: ITDABuilder, dst: ITDABuilder) -> Any:
    from itda_lens.dictionary import AtomStore

    s = src.store
    return AtomStore.restore(
        s.atoms.clone(), s.labels.clone(), s.token_ids.clone(), list(s.blocks),
        device=s.device, dtype=s.dtype,
    )  # fmt: skip


def fmt_enc(r: dict) -> dict:
    return {
        "data": r["data"],
        "d": r["d"],
        "atoms": f"{r['atoms']:,}",
        "Gram rows": r["rows"],
        "plan s": f"{r['plan_s']:.1f}",
        "encode tok/s": f"{r['encode_tok_s']:,.0f}",
        "literal tok/s": f"{r['literal_tok_s']:,.1f}",
        "x literal": f"{r['x_literal']:.1f}x",
        "floor tok/s": f"{r['floor_tok_s']:,.0f}",
        "x floor (slower)": f"{r['x_floor']:.1f}x",
        "peak extra memory": fmt_bytes(r["peak_extra_bytes"]),
        "rows computed / token": f"{r['rows_computed_per_token']:.1f}",
        "codes = literal (tokens)": f"{r['same_codes_as_literal']:.0%}",
    }


def budget_sweep(args: Any) -> None:
    """What raising the memory budget buys past the 4 GiB default: 65,536 atoms at d = 768 (the
    full int16 Gram is 8 GiB) encoded at each budget, in one process."""
    t0 = time.perf_counter()
    n, d = (4096, 256) if args.quick else (65536, 768)
    atoms = F.normalize(synthetic(n, d, 0, args.device), dim=1)
    x = synthetic(256 if args.quick else 2048, d, 1, args.device)
    rows = []
    for size in args.budget_sweep:
        set_memory_budget(size)
        rows.append({"budget": size, **encode_row("synthetic", atoms, x, 16, args.device)})
        print(rows[-1], flush=True)
    shown = [{"budget": r["budget"], **fmt_enc(r)} for r in rows]
    print(table(shown, list(shown[0])))
    record(
        "scale_budget",
        args,
        {"budgets": table_spec(shown, list(shown[0]))},
        {"device": args.device, "encode": rows},
        time.perf_counter() - t0,
    )


def gpu_rows(args: Any, sizes: list[int], d: int, cap: float) -> list[dict]:
    """The GPU-path rows: one per dictionary size, printed as they come."""
    rows = []
    for n in sizes:
        seg = 256 if args.quick else 2048 if n <= 32768 else 512
        rows.append({"atoms": n, **gpu_path_row(n, d, args.device, seg, min(cap, 300.0))})
        print(rows[-1], flush=True)
    return rows


def gpu_section(args: Any) -> None:
    """Only the exact rule's torch path against the batch rule (``--gpu-only``)."""
    t0 = time.perf_counter()
    sizes, d = ([1024, 4096], 256) if args.quick else (SIZES, DIMS[0])
    rows = gpu_rows(args, sizes, d, 20.0 if args.quick else args.build_seconds)
    shown = [fmt_gpu(r) for r in rows]
    print(table(shown, list(shown[0])))
    record(
        "scale_gpu",
        args,
        {"gpu": table_spec(shown, list(shown[0]))},
        {"budget": memory_budget(args.device), "device": args.device, "d": d, "gpu": rows},
        time.perf_counter() - t0,
    )


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", default="4GiB", help="memory budget (default 4GiB)")
    parser.add_argument("--build-seconds", type=float, default=600.0)
    parser.add_argument(
        "--budget-sweep",
        nargs="+",
        metavar="SIZE",
        help="only encode 65,536 atoms at d = 768 at each of these budgets (scale_budget.json)",
    )
    parser.add_argument(
        "--gpu-only", action="store_true", help="only the GPU-path section (scale_gpu.json)"
    )
    args = parser.parse_args()
    prepare(args)
    if args.budget_sweep:
        budget_sweep(args)
        return
    set_memory_budget(args.budget)
    dev = args.device
    budget = memory_budget(dev)
    if args.gpu_only:
        gpu_section(args)
        return
    t0 = time.perf_counter()
    sizes, dims = ([1024, 4096], [256]) if args.quick else (SIZES, DIMS)
    warm = F.normalize(torch.randn(16, 8), dim=1)
    for dt in (torch.float32, torch.float64):  # compile the kernels before anything is timed
        matching_pursuit(torch.randn(4, 8, dtype=dt), warm.to(dt), 2)
    print(f"memory budget {fmt_bytes(memory_budget(dev))} on {dev}; k = {K}", flush=True)

    enc: list[dict] = []
    configs = [("synthetic", n, d) for d in dims for n in sizes]
    if not args.quick:
        configs.append(("synthetic", 16384, 512))  # the size of the F speed goal
    for data, n, d in configs:
        tokens = 256 if args.quick else (2048 if n <= 32768 else 512 if n <= 65536 else 256)
        atoms = F.normalize(synthetic(n, d, 0, dev), dim=1)
        x = synthetic(tokens, d, 1, dev)
        enc.append(encode_row(data, atoms, x, 16 if args.quick or n > 32768 else 32, dev))
        print({k: v for k, v in enc[-1].items()}, flush=True)
    acts = zoo_activations(max(sizes) + 4096, dev)
    for n in sizes:
        atoms = F.normalize(acts[:n], dim=1)
        x = acts[max(sizes) : max(sizes) + (256 if args.quick else 2048)]
        enc.append(encode_row(f"zoo {ZOO[0]} L3", atoms, x, 32, dev))
        print(enc[-1], flush=True)

    builds: list[dict] = []
    gpu: list[dict] = []

    def save() -> None:  # after each section, so a run cut short keeps what it measured
        shown = {"encode": [fmt_enc(r) for r in enc], "build": [fmt_build(r) for r in builds],
                 "gpu": [fmt_gpu(r) for r in gpu]}  # fmt: skip
        tables = {}
        for name, rows in shown.items():
            if rows:
                print()
                print(table(rows, list(rows[0])))
                tables[name] = table_spec(rows, list(rows[0]))
        data = {"budget": memory_budget(dev), "device": dev, "encode": enc, "build": builds}
        record("scale", args, tables, {**data, "gpu": gpu}, time.perf_counter() - t0)

    save()
    cap = 20.0 if args.quick else args.build_seconds
    # the dictionaries whose full Gram fits the budget first, then the goal run, then the rest
    fits = [(d, n) for d in dims for n in sizes if n <= GramRows.max_full_atoms(budget)]
    rest = [(d, n) for d in dims for n in sizes if (d, n) not in fits]
    for d, n in fits:
        builds.append(build_row(n, d, 4 * n, BUILD_COS, cap, dev))
        print(builds[-1], flush=True)
    if not args.quick:
        atoms_goal, acts_goal, cos_goal = GOAL
        builds.append(build_row(atoms_goal, 768, acts_goal, cos_goal, 3600.0, dev))
        print(builds[-1], flush=True)
    for d, n in rest:
        builds.append(build_row(n, d, 4 * n, BUILD_COS, cap, dev))
        print(builds[-1], flush=True)
    save()

    gpu.extend(gpu_rows(args, sizes, dims[0], cap))
    save()


def fmt_build(r: dict) -> dict:
    return {
        "d": r["d"],
        "max_atoms": f"{r['max_atoms']:,}",
        "cos": r["cos"],
        "atoms": f"{r['atoms']:,}",
        "tokens read": f"{r['tokens_read']:,}",
        "stopped": r["stop"],
        "wall s": f"{r['wall_s']:.0f}",
        "build tok/s": f"{r['build_tok_s']:,.0f}",
        "peak extra memory": fmt_bytes(r["peak_extra_bytes"]),
    }


def fmt_gpu(r: dict) -> dict:
    return {
        "atoms (max)": f"{r['atoms']:,}",
        "atoms at segment start": f"{r['atoms_at_start']:,}",
        "exact: steps / 1k tokens": f"{r['exact_steps_per_1k']:.0f}",
        "exact: torch ops / 1k tokens": f"{r['exact_ops_per_1k']:,.0f}",
        "exact: atoms added": r["exact_added"],
        "batch rule: steps / 1k tokens": f"{r['batch_steps_per_1k']:.1f}",
        "batch rule: torch ops / 1k tokens": f"{r['batch_ops_per_1k']:,.0f}",
        "batch rule: atoms added": r["batch_added"],
    }


if __name__ == "__main__":
    main()
