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


@njit(inline="always")
def _dot(a, b):  # pragma: no cover - jitted
    """Sequential dot product: the same rounding wherever it is called."""
    s = a.dtype.type(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(inline="always")
def _gram_row(atoms, gram, i):  # pragma: no cover - jitted
    """Fill row and column ``i`` of ``gram`` (over atoms 0..i) from ``atoms[i]``."""
    a = atoms[i]
    for j in range(i):
        g = _dot(a, atoms[j])
        gram[i, j] = g
        gram[j, i] = g
    gram[i, i] = _dot(a, a)


@njit(fastmath={"contract"}, cache=True)
def extend_gram(atoms, gram, start, end):  # pragma: no cover - jitted
    """Gram rows and columns of atoms ``start..end-1`` (one at a time, as the exact rule adds them)."""
    for i in range(start, end):
        _gram_row(atoms, gram, i)


@njit(fastmath={"contract"}, cache=True)
def exact_mp(
    x,
    corr0,
    atoms,
    gram,
    n0,
    k,
    threshold,
    early,
    pos,
    cutoff,
    patience,
    max_new,
    c,
    bits,
    mask,
    accepted,
):  # pragma: no cover - jitted
    """ITDA's exact add rule with MP over a sub-batch, one token at a time in stream order.

    ``x`` [T, d] are the rows, ``corr0`` [T, n0] their correlations with the ``n0`` atoms at the
    sub-batch start (one matmul outside); ``atoms`` [cap, d] and ``gram`` [cap, cap] are the
    store's buffers, written in place as atoms are added (the Gram row by :func:`_gram_row`).
    Row t is read iff ``pos[t] <= cutoff``; each addition moves the cutoff to ``pos + patience``
    (``patience < 0``: never). Stops after ``max_new`` additions. A token is rejected as soon as its
    residual guarantees ``cos >= early`` (``threshold`` plus a margin above rounding; ``early <= 0``
    or ``>= 1``: never early). ``c`` [cap] is a work row and
    ``bits`` its integer view (``mask`` clears the sign bit, as in :func:`mp_gram`). Writes the
    added rows' indices into ``accepted``; returns (atoms added, rows read).
    """
    T, d = x.shape
    cap = gram.shape[0]
    gram_flat = gram.ravel()
    idx = np.empty(k, dtype=np.int64)
    val = np.empty(k, dtype=x.dtype)
    recon = np.empty(d, dtype=x.dtype)
    n, added = n0, 0
    for t in range(T):
        if pos[t] > cutoff:
            return added, t
        xt = x[t]
        xx = _dot(xt, xt)
        accept = n == 0
        if not accept:
            for i in range(n0):
                c[i] = corr0[t, i]
            for i in range(n0, n):
                c[i] = _dot(xt, atoms[i])
            # MP with unit atoms: |r|^2 drops by v^2 per step, and cos(x, x_hat) >= sqrt(1 - |r|^2/|x|^2)
            # for any later residual, so once |r|^2 <= bound the token is reconstructed above the
            # threshold whatever the remaining steps do: rejected early, the same verdict
            bound = (1.0 - early * early) * xx if 0.0 < early < 1.0 else -1.0
            rr = xx
            done = False
            j = _first_absmax(bits[:n], mask)
            for s in range(k):
                v = c[j]
                idx[s] = j
                val[s] = v
                rr -= v * v
                if rr <= bound:
                    done = True
                    break
                if s + 1 < k:
                    g = gram_flat[j * cap : j * cap + n]
                    for i in range(n):
                        c[i] -= v * g[i]
                    j = _first_absmax(bits[:n], mask)
            if not done:
                recon[:] = 0
                for s in range(k):
                    a = atoms[idx[s]]
                    for i in range(d):
                        recon[i] += val[s] * a[i]
                denom = np.sqrt(xx) * np.sqrt(_dot(recon, recon))
                cos = _dot(xt, recon) / max(denom, 1e-30)
                accept = cos < threshold
        if accept:
            norm = np.sqrt(xx)
            for i in range(d):
                atoms[n, i] = xt[i] / norm
            _gram_row(atoms, gram, n)
            accepted[added] = t
            added += 1
            n += 1
            if patience >= 0:
                cutoff = pos[t] + patience
            if added == max_new:
                return added, t + 1
    return added, T
