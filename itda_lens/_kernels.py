"""Fused CPU kernel for Gram-space matching pursuit (numba; numpy arrays in, no torch).

Per token, per step: ``c -= v * G[j]`` (a vectorised axpy over one row of the Gram matrix), then
the first index of ``max |c|``. The maximum is found on the integer bit patterns with the sign bit
cleared — for finite floats their unsigned order is the order of ``|c|`` — because integer max
reductions vectorise where float ones do not; a search over 64-entry blocks then finds the first
maximal entry. One token's correlation row stays in cache for all ``k`` steps. Exactly the
picks of ``argmax |c|`` (first index on ties) and the same coefficients up to float rounding.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BLOCK = 64


@njit(inline="always")
def _first_absmax(bits: np.ndarray, mask: np.integer) -> int:
    """First index of max |c|: one vectorised max over the sign-cleared bits, then a search in
    64-entry blocks that only drops to a scalar scan inside the block holding the maximum."""
    n = bits.shape[0]
    best = bits[0] & mask
    for i in range(n):
        a = bits[i] & mask
        best = a if a > best else best
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        hit = 0
        for i in range(lo, hi):
            hit += (bits[i] & mask) == best
        if hit:
            for i in range(lo, hi):
                if (bits[i] & mask) == best:
                    return i
    return 0


@njit(inline="always")
def _mp_token(c, u, gram_flat, row_stride, k, mask, idx, val):  # pragma: no cover - jitted
    """k steps of MP for one token: ``c`` is its correlation row (overwritten), ``u`` its bits."""
    n = c.shape[0]
    j = _first_absmax(u, mask)
    for s in range(k):
        v = c[j]
        idx[s] = j
        val[s] = v
        g = gram_flat[j * row_stride : j * row_stride + n]
        for i in range(n):
            c[i] -= v * g[i]
        j = _first_absmax(u, mask)


@njit(parallel=True, fastmath={"contract"}, cache=True)
def mp_gram(corr, bits, gram_flat, row_stride, k, mask, idx, val):  # pragma: no cover - jitted
    """MP in correlation space; ``corr`` [T, n] is overwritten, ``bits`` is its integer view.
    Tokens run in parallel threads."""
    for t in prange(corr.shape[0]):
        _mp_token(corr[t], bits[t], gram_flat, row_stride, k, mask, idx[t], val[t])


@njit(fastmath={"contract"}, cache=True)
def mp_gram_serial(corr, bits, gram_flat, row_stride, k, mask, idx, val):  # pragma: no cover
    """The same, on one thread: for a few tokens, starting threads costs more than it saves (and
    far more when the CPU is busy)."""
    for t in range(corr.shape[0]):
        _mp_token(corr[t], bits[t], gram_flat, row_stride, k, mask, idx[t], val[t])
