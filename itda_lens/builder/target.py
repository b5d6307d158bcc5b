"""Size by target: the cos_threshold whose converged dictionary has about N atoms.

The dictionary size grows with the threshold (a higher threshold calls more reconstructions poor),
so a bracketing search on the threshold finds it: each step builds the exact greedy dictionary
over the sample (stopping early once it holds clearly too many atoms) and narrows the bracket,
guessing by interpolation in log(atoms), and bisecting after a guess that did not halve the
bracket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder

#: Makes the builder a trial build runs: ``make(d_in, cfg, device)``.
BuilderFactory = Callable[[int, BuildConfig, torch.device], ITDABuilder]
#: Rows fed to the builder per call while searching (the exact rule's result does not depend on it).
SEARCH_BATCH = 4096


class ThresholdSearch(NamedTuple):
    """The threshold found, the atoms it gives on the sample, and every (threshold, atoms) tried."""

    threshold: float
    atoms: int
    target: int
    sample_rows: int
    history: list[tuple[float, int]]
    seconds: float


def atoms_at(
    acts: Float[Tensor, "n d"],
    cfg: BuildConfig,
    cap: int | None = None,
    *,
    outputs: Float[Tensor, "n d_out"] | None = None,
    make: BuilderFactory = ITDABuilder,
) -> int:
    """Size of the dictionary ``cfg`` builds over ``acts`` (at most ``cap``): with ``make``'s
    builder (``make(d_in, cfg, device)``; a transcoder's reads the rows' ``outputs`` too)."""
    cfg = cfg.replace(
        target_atoms=None, refine="none", max_atoms=cap if cap is not None else cfg.max_atoms
    )
    b = make(acts.shape[1], cfg, acts.device)
    n = acts.shape[0]
    for start in range(0, n, SEARCH_BATCH):
        x = acts[start : start + SEARCH_BATCH]
        m = x.shape[0]
        labels = torch.stack([torch.arange(start, start + m), torch.full((m,), -1)], dim=1)
        y = None if outputs is None else outputs[start : start + SEARCH_BATCH]
        b.update(
            ActivationBatch(x, labels, torch.full((m,), -1), torch.ones(m, dtype=torch.bool), y)
        )
        if b.stopped:
            break
    return len(b.store)


def find_threshold(
    acts: Float[Tensor, "n d"],
    cfg: BuildConfig,
    target: int,
    *,
    max_steps: int = 30,
    outputs: Float[Tensor, "n d_out"] | None = None,
    make: BuilderFactory = ITDABuilder,
) -> ThresholdSearch:
    """Search ``cos_threshold`` so that ``cfg``'s build over ``acts`` has ``target`` atoms
    (within ``cfg.target_tolerance``, at least one atom); returns the closest found within
    ``max_steps``. A trial build stops once it holds twice the target (its count is then a lower
    bound, which is all the search needs there). ``outputs`` and ``make`` are :func:`atoms_at`'s."""
    start = time.perf_counter()
    n = acts.shape[0]
    if target > n:
        raise ValueError(
            f"target_atoms={target} exceeds the {n} activations sampled to find the threshold; "
            "read more tokens or ask for fewer atoms"
        )
    tol = max(1, math.floor(cfg.target_tolerance * target))
    cap = min(n, 2 * target + 16)
    if cfg.max_atoms is not None:
        cap = min(cap, cfg.max_atoms)
    # brackets (threshold, atoms): lo gives too few, hi too many (1.0 is assumed until tried)
    lo, hi = (0.0, 0), (1.0, cap)
    history: list[tuple[float, int]] = []
    best: tuple[float, int] | None = None
    bisect = False
    for _ in range(max_steps):
        width = hi[0] - lo[0]
        if (best and abs(best[1] - target) <= tol) or width < 1e-7:
            break
        if bisect:
            t = (lo[0] + hi[0]) / 2
        else:
            t = _next_threshold(lo, hi, target, [p for p in history if p[1] < cap])
        got = atoms_at(acts, cfg.replace(cos_threshold=t), cap, outputs=outputs, make=make)
        history.append((t, got))
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (t, got)
        if got < target:
            lo = (t, got)
        else:
            hi = (t, got)
        # a guess that did not halve the bracket is followed by a bisection
        bisect = not bisect and hi[0] - lo[0] > width / 2
    assert best is not None
    if best[1] < target - tol and hi[0] == 1.0:
        raise ValueError(
            f"even cos_threshold close to 1 gives only {best[1]} atoms over the {n} sampled "
            f"activations (target {target}): they are too redundant for this many atoms; "
            "read more tokens or ask for fewer"
        )
    return ThresholdSearch(best[0], best[1], target, n, history, time.perf_counter() - start)


def _next_threshold(
    lo: tuple[float, int], hi: tuple[float, int], target: int, exact: list[tuple[float, int]]
) -> float:
    """A guess: interpolation in log(atoms) between the brackets when both counts are exact, else
    a secant through the two highest exact trials below the target, else bisection; always at
    least 10% of the bracket away from its ends."""
    (t0, n0), (t1, n1) = lo, hi
    below = sorted(p for p in exact if p[1] < target and p[1] > 0)
    guess = None
    if n0 > 0 and (t1, n1) in exact and n1 > n0:
        guess = t0 + (t1 - t0) * (math.log(target / n0) / math.log(n1 / n0))
    elif len(below) >= 2 and below[-1][1] > below[-2][1]:
        (ta, na), (tb, nb) = below[-2], below[-1]
        guess = tb + (tb - ta) * math.log(target / nb) / math.log(nb / na)
    if guess is None:
        return (t0 + t1) / 2
    return min(max(guess, t0 + 0.1 * (t1 - t0)), t1 - 0.1 * (t1 - t0))
