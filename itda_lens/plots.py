"""Small matplotlib helpers (Agg backend, PNG files) shared by the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    step: bool = False,
    markers: bool = True,
) -> Path:
    """One line per series ``{label: (xs, ys)}``, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (xs, ys) in series.items():
        if step:
            ax.step(xs, ys, where="post", label=label)
        else:
            ax.plot(xs, ys, marker="o" if markers else None, markersize=3, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
