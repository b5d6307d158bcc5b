"""Data-parallel ITDA builds: 1 process against 2 (gloo on CPU, 1 thread each) on the same stream.

Each world size builds the zoo model's dictionary at ``blocks.2.hook_resid_post`` (k = 16,
cos_threshold = 0.9, batches of 32 windows) in freshly spawned processes; rank 0 reports the
build's wall-clock (model load excluded), its forward and dictionary seconds, and the bytes of
candidates all ranks sent (``wire_bytes``), which are set against the bytes of the activations the
ranks read (what a naive all-gather would send). The 2-process dictionary must be the 1-process one
atom for atom. From the measured 1-process forward time F and the per-rank dictionary time D_N of
the data-parallel build, the speed-up on N devices is estimated as (F + D_1) / (F / N + D_N): the
forward pass shards, the resolution of the gathered candidates does not.

    python benchmarks/distributed.py            # full run (a few minutes)
    python benchmarks/distributed.py --quick    # reduced run, same code and tables
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import bench_parser, fmt_bytes, prepare, record, table, table_spec

HOOK = "blocks.2.hook_resid_post"
SETTINGS = {"k": 16, "cos_threshold": 0.9, "batch_size": 32}


def rank_main(rank: int, world: int, store: str, out: str, windows: int) -> None:
    """One rank's build (no process group for world 1); rank 0 writes its result as JSON."""
    import torch.distributed as dist

    from itda_lens import build_itda, zoo

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    model = zoo.load_model()
    tokens = zoo.load_tokens("train", windows)
    t0 = time.perf_counter()
    itda = build_itda(model, tokens, HOOK, progress=False, **SETTINGS)[HOOK]
    wall = time.perf_counter() - t0
    if rank == 0:
        record = itda.require_build_record()
        result = {
            "wall_s": wall,
            "tokens": record.tokens_seen,
            "atoms": itda.cfg.d_sae,
            "forward_s": record.forward_seconds,
            "dictionary_s": record.dictionary_seconds,
            "wire_bytes": record.wire_bytes,
            "batches": record.batches,
            "activation_bytes": record.tokens_seen * model.cfg.d_model * 4,
            "labels": itda.atom_labels.tolist(),
        }
        Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, windows: int, tmp: Path) -> dict[str, Any]:
    """Spawn ``world`` ranks of this script and return rank 0's result."""
    out, store = tmp / f"world{world}.json", tmp / f"store{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(r),
                str(world),
                str(store),
                str(out),
                str(windows),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed:\n{errors[0][-2000:]}\n{errors[-1][-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    if sys.argv[1:2] == ["--rank"]:
        rank, world, store, out, windows = sys.argv[2:7]
        rank_main(int(rank), int(world), store, out, int(windows))
        return
    parser = bench_parser(__doc__, "bench_out/distributed")
    args = parser.parse_args()
    prepare(args)
    t0 = time.perf_counter()
    windows = 64 if args.quick else 512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            r = run_world(world, windows, Path(tmp))
            rows.append({"world": world, **r})
            print({k: v for k, v in r.items() if k != "labels"}, flush=True)
    one, two = rows
    same = one["labels"] == two["labels"]
    for r in rows:
        r["tok_per_s"] = r["tokens"] / r["wall_s"]
        r["speedup"] = one["wall_s"] / r["wall_s"]
        r["wire_per_batch"] = r["wire_bytes"] / r["batches"]
        r["acts_per_batch"] = r["activation_bytes"] / r["batches"]
    shown = [
        {
            "processes": r["world"],
            "tokens": f"{r['tokens']:,}",
            "atoms": r["atoms"],
            "wall s": f"{r['wall_s']:.1f}",
            "tok/s": f"{r['tok_per_s']:,.0f}",
            "speed-up": f"{r['speedup']:.2f}x",
            "forward s (rank 0)": f"{r['forward_s']:.2f}",
            "dictionary s (rank 0)": f"{r['dictionary_s']:.2f}",
            "candidates sent per batch": fmt_bytes(r["wire_per_batch"]),
            "activations per batch": fmt_bytes(r["acts_per_batch"]),
            "same dictionary as 1 process": str(r["labels"] == one["labels"]),
        }
        for r in rows
    ]
    cols = list(shown[0])
    print(table(shown, cols))
    f1, d1, d2 = one["forward_s"], one["dictionary_s"], two["dictionary_s"]
    estimate = [
        {
            "devices": n,
            "forward s / device": f"{f1 / n:.2f}",
            "dictionary s / device": f"{d2:.2f}",
            "estimated speed-up": f"{(f1 + d1) / (f1 / n + d2):.2f}x",
        }
        for n in (2, 4, 8, 64)
    ]
    est_cols = list(estimate[0])
    print(f"\nestimate from F = {f1:.2f} s, D_1 = {d1:.2f} s, D_2 = {d2:.2f} s:")
    print(table(estimate, est_cols))
    print(f"2 processes built the 1-process dictionary: {same}")
    record(
        "distributed",
        args,
        {"main": table_spec(shown, cols), "estimate": table_spec(estimate, est_cols)},
        {"rows": [{k: v for k, v in r.items() if k != "labels"} for r in rows], "same": same},
        time.perf_counter() - t0,
    )
    if not same:
        raise SystemExit("the 2-process build differs from the 1-process build")


if __name__ == "__main__":
    main()
