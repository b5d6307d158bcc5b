"""Shared benchmark helpers: the common options, wall-clock timing and peak extra RSS of a call in
this process, tables and plot series."""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


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


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


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
