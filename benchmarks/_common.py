"""Shared benchmark helpers: the common options, wall-clock timing and peak extra RSS of a call in
this process, tables, plot series, and the one place results are recorded.

Every benchmark ends with :func:`record`: its JSON (raw rows, the tables as printed, the command and
the machine) goes to ``--out`` and, for full runs, to ``benchmarks/results/<name>.json``, which is
committed; ``benchmarks/render.py`` renders the tables in ``benchmarks/README.md`` from those files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@dataclass
class Measured:
    seconds: float
    peak_extra_bytes: int
    result: Any


def measure(fn: Callable[[], Any], interval: float = 0.002) -> Measured:
    """Run ``fn`` once; sample RSS in a thread to get the peak above the starting RSS."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return Measured(seconds, peak[0] - base, result)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (best of a few square products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(measure(lambda: a @ b).seconds for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def table_spec(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """A table as recorded in results JSON: column names and every cell as the string shown."""
    return {"columns": columns, "rows": [[str(r.get(c, "")) for c in columns] for r in rows]}


def markdown(spec: dict[str, Any]) -> str:
    """The markdown of a recorded table (what the README shows)."""
    cols = spec["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in spec["rows"]]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    return markdown(table_spec(rows, columns))


def record(
    name: str,
    args: argparse.Namespace,
    tables: dict[str, dict[str, Any]],
    data: Any,
    seconds: float,
) -> Path:
    """Write the run's JSON (tables as printed + raw data) to ``--out`` and, unless ``--quick``,
    to ``benchmarks/results/<name>.json``; print where. Returns the results file."""
    payload = {
        "benchmark": name,
        "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "quick": bool(args.quick),
        "seconds": round(seconds, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": getattr(args, "threads", None),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "tables": tables,
        "data": data,
    }
    text = json.dumps(payload, indent=1, default=_jsonable) + "\n"
    targets = [Path(args.out) / f"{name}.json"] if getattr(args, "out", None) else []
    if not args.quick:
        targets.append(RESULTS / f"{name}.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"\nwrote {', '.join(str(p) for p in targets)} ({seconds:.0f} s)")
    return targets[-1] if targets else Path()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def bench_parser(doc: str | None, out: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (a reduced run of the same code),
    ``--threads`` and, for those that write results, ``--out``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    if out is not None:
        parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def prepare(args: argparse.Namespace) -> Path:
    """Set the thread count, silence library warnings and create ``--out``; returns it."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def series_by(
    rows: list[dict[str, Any]], group: str, x: str, y: str
) -> dict[str, tuple[list[Any], list[Any]]]:
    """Line-plot series: one per distinct ``row[group]`` (first-seen order), points ``(x, y)``."""
    return {
        g: ([r[x] for r in rows if r[group] == g], [r[y] for r in rows if r[group] == g])
        for g in dict.fromkeys(r[group] for r in rows)
    }
