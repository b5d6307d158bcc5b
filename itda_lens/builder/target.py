"""Size by target: the cos_threshold whose converged dictionary has about N atoms.

The dictionary size grows with the threshold (a higher threshold calls more reconstructions poor),
so a bracketing search on the threshold finds it: each step builds the exact greedy dictionary
over the sample (stopping early once it holds clearly too many atoms) and narrows the bracket,
stepping by interpolation in log(atoms) and falling back to bisection.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder

#: Rows fed to the builder per call while searching (the exact rule's result does not depend on it).
SEARCH_BATCH = 4096


class ThresholdSearch(NamedTuple):
    """The threshold found, the atoms it gives on the sample, and every (threshold, atoms) tried."""

    threshold: float
    atoms: int
    target: int
    sample_rows: int
    history: list[tuple[float, int]]


def atoms_at(acts: Float[Tensor, "n d"], cfg: BuildConfig, cap: int | None = None) -> int:
    """Size of the dictionary ``cfg`` builds over ``acts`` (at most ``cap``)."""
    cfg = cfg.replace(target_atoms=None, max_atoms=cap if cap is not None else cfg.max_atoms)
    b = ITDABuilder(acts.shape[1], cfg, device=acts.device)
    n = acts.shape[0]
    for start in range(0, n, SEARCH_BATCH):
        x = acts[start : start + SEARCH_BATCH]
        m = x.shape[0]
        labels = torch.stack([torch.arange(start, start + m), torch.full((m,), -1)], dim=1)
        b.update(ActivationBatch(x, labels, torch.full((m,), -1), torch.ones(m, dtype=torch.bool)))
        if b.stopped:
            break
    return len(b.store)


def find_threshold(
    acts: Float[Tensor, "n d"],
    cfg: BuildConfig,
    target: int,
    *,
    rel_tol: float = 0.01,
    max_steps: int = 30,
) -> ThresholdSearch:
    """Search ``cos_threshold`` so that ``cfg``'s build over ``acts`` has ``target`` atoms
    (within ``rel_tol``, at least one atom); returns the closest found within ``max_steps``."""
    n = acts.shape[0]
    if target > n:
        raise ValueError(
            f"target_atoms={target} exceeds the {n} activations sampled to find the threshold; "
            "read more tokens or ask for fewer atoms"
        )
    tol = max(1, math.floor(rel_tol * target))
    cap = min(n, 2 * target + 64)
    if cfg.max_atoms is not None:
        cap = min(cap, cfg.max_atoms)
    lo, hi = (0.0, 0), (1.0, atoms_at(acts, cfg.replace(cos_threshold=1.0), cap))
    history = [hi]
    best = hi
    if hi[1] < target:
        raise ValueError(
            f"even cos_threshold=1 gives only {hi[1]} atoms over the {n} sampled activations "
            f"(target {target}); the activations are too redundant for this many atoms"
        )
    for _ in range(max_steps):
        if abs(best[1] - target) <= tol or hi[0] - lo[0] < 1e-7:
            break
        t = _next_threshold(lo, hi, target)
        got = atoms_at(acts, cfg.replace(cos_threshold=t), cap)
        history.append((t, got))
        if abs(got - target) < abs(best[1] - target):
            best = (t, got)
        if got < target:
            lo = (t, got)
        else:
            hi = (t, got)
    return ThresholdSearch(best[0], best[1], target, n, history)


def _next_threshold(lo: tuple[float, int], hi: tuple[float, int], target: int) -> float:
    """Interpolate in log(atoms) between the brackets, kept away from their ends (else bisect)."""
    (t0, n0), (t1, n1) = lo, hi
    mid = (t0 + t1) / 2
    if n0 < 1 or n1 <= n0:
        return mid
    f = (math.log(target) - math.log(n0)) / (math.log(n1) - math.log(n0))
    f = min(max(f, 0.1), 0.9)
    return t0 + f * (t1 - t0)
