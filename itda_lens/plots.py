"""Small matplotlib helpers (Agg backend, PNG files) shared by the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker


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
        xs_all = sorted({float(x) for xs, _ in series.values() for x in xs})
        if 0 < len(xs_all) <= 8:  # label the data points with plain numbers, not 8x10^0
            ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def heatmap(
    matrix: Sequence[Sequence[float]],
    path: str | Path,
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """A labelled heatmap with the values written in the cells, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def histograms(
    series: dict[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str,
    title: str,
    bins: int = 60,
) -> Path:
    """Overlaid step histograms (log count axis), one per series, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    values = [v for vs in series.values() for v in vs]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    for label, vs in series.items():
        ax.hist(vs, bins=bins, range=(lo, hi if hi > lo else lo + 1), histtype="step", label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
