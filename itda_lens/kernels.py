"""Compiled CPU kernels for matching pursuit over Gram rows (numba; numpy arrays in, no torch).

Each token keeps its correlations ``c`` (approximate: updated with the stored Gram rows, error at
most ``E``) and its residual ``r`` (exact, as the literal algorithm keeps it). A step finds
``m = max |c|`` and checks every atom with ``|c_i| >= m - 2E`` by an exact dot product with ``r``;
the largest exact ``|<r, a_i>|`` (first index on ties) is the pick and its value the coefficient.
So the rows only filter: supports and coefficients are the literal algorithm's whatever rows are
stored (int16 quantized or float). Too many candidates (a tiny residual, exact ties) refresh ``c``
exactly from ``r``.

The maximum is found on the integer bit patterns with the sign bit cleared — for finite floats
their order is the order of ``|c|`` — per 64-entry block (fixed trip counts vectorise), so the
candidate scan only visits blocks whose maximum reaches the bound. One token's ``c`` stays in
cache for all ``k`` steps; only the picked rows stream from memory.

:func:`mp_rows` encodes many tokens in parallel and stops a token that needs a row the cache does
not hold (``need``), so that its caller computes all missing rows in one GEMM and resumes them.
:func:`exact_mp` is ITDA's exact add rule: tokens one at a time in stream order, each pursued over
every atom added before it, atoms and their Gram entries written in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Entries per block of the block maxima.
BLOCK = 64
#: Kernels may reassociate sums (vectorised dot products) and contract to FMA.
FASTMATH = {"contract", "reassoc"}
#: int16 Gram rows hold round(QSCALE * g) (as :data:`itda_lens.gram.QSCALE`).
QSCALE = 32767


@njit(inline="always")
def _dot(a, b):  # pragma: no cover - jitted
    s = a.dtype.type(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(inline="always")
def _block_max(bits, mask, n, bmax):  # pragma: no cover - jitted
    """``bmax[b]`` = the largest sign-cleared bit pattern (= largest |c|) in block b of c[:n]."""
    full = n // BLOCK
    for b in range(full):
        lo = b * BLOCK
        m = bits[lo] & mask
        for i in range(lo, lo + BLOCK):
            a = bits[i] & mask
            m = a if a > m else m
        bmax[b] = m
    if n % BLOCK:
        lo = full * BLOCK
        m = bits[lo] & mask
        for i in range(lo, n):
            a = bits[i] & mask
            m = a if a > m else m
        bmax[full] = m


@njit(inline="always")
def _first_absmax(c, bits, mask, n, bmax):  # pragma: no cover - jitted
    """First index of max |c[:n]| (from current block maxima)."""
    nblk = (n + BLOCK - 1) // BLOCK
    mb = bmax[0]
    for b in range(nblk):
        mb = bmax[b] if bmax[b] > mb else mb
    for b in range(nblk):
        if bmax[b] == mb:
            for i in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                if (bits[i] & mask) == mb:
                    return i
    return 0


@njit(inline="always")
def _pick(c, bits, mask, n, bmax, bound, r, atoms, maxcand, scr, sbits):  # pragma: no cover
    """Exact pick among atoms within ``2 * bound`` of max |c|: (index, value, candidates), or
    index -1 when there are more than ``maxcand`` candidates (or the bound reaches 0)."""
    j = _first_absmax(c, bits, mask, n, bmax)
    thr = abs(c[j]) - 2 * bound
    if thr <= 0:
        return -1, c.dtype.type(0), n
    scr[0] = thr
    tb = sbits[0]
    nblk = (n + BLOCK - 1) // BLOCK
    best, bv, nc = -1, c.dtype.type(0), 0
    for b in range(nblk):
        if bmax[b] >= tb:
            for i in range(b * BLOCK, min(b * BLOCK + BLOCK, n)):
                if abs(c[i]) >= thr:
                    nc += 1
                    if nc > maxcand:
                        return -1, bv, nc
                    e = _dot(r, atoms[i])
                    if best < 0 or abs(e) > abs(bv):
                        best, bv = i, e
    return best, bv, nc


@njit(inline="always")
def _mp_token(
    c,
    bits,
    mask,
    n,
    r,
    atoms,
    rows,
    slot,
    scale,
    u_row,
    eps,
    nx,
    k,
    s,
    bound,
    idx,
    val,
    bmax,
    scr,
    sbits,
    maxcand,
    stop_rr,
    stats,
):  # pragma: no cover - jitted
    """MP steps s..k-1 of one token whose ``c`` (error <= ``bound``), ``bmax`` and ``r`` are
    current. Returns (steps done, bound, need): ``need`` >= 0 is an atom whose row is missing (its
    pick is recorded, the update pending), -1 done, -2 stopped early (``|r|^2 <= stop_rr``)."""
    d = r.shape[0]
    while s < k:
        j, v, nc = _pick(c, bits, mask, n, bmax, bound, r, atoms, maxcand, scr, sbits)
        stats[0] += nc
        if j < 0:  # refresh: exact correlations from the residual
            stats[1] += 1
            for i in range(n):
                c[i] = _dot(r, atoms[i])
            bound = (d + 2) * eps * nx * 2
            _block_max(bits, mask, n, bmax)
            j = _first_absmax(c, bits, mask, n, bmax)
            v = c[j]
        idx[s] = j
        val[s] = v
        a = atoms[j]
        for i in range(d):
            r[i] -= v * a[i]
        bound += abs(v) * (u_row + 2 * eps) + 2 * eps * nx
        s += 1
        if stop_rr >= 0 and _dot(r, r) <= stop_rr:
            return s, bound, -2
        if s < k:
            sl = slot[j]
            if sl < 0:
                return s, bound, j
            w = v * scale
            row = rows[sl]
            for i in range(n):
                c[i] -= w * row[i]
            _block_max(bits, mask, n, bmax)
    return s, bound, -1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def mp_rows(
    x,
    corr,
    bits,
    mask,
    atoms,
    rows,
    slot,
    scale,
    u_row,
    eps,
    k,
    maxcand,
    todo,
    step,
    idx,
    val,
    resid,
    bounds,
    need,
    bmax,
    scr,
    sbits,
    stats,
):  # pragma: no cover - jitted
    """MP for the tokens ``todo`` of a chunk, in parallel. ``corr`` [T, n] holds ``x @ atoms.T``
    for fresh tokens (``step == 0``) and is overwritten; a token stalled on a missing row resumes
    with that row's update. After the call ``need[t]`` >= 0 names the row token t waits for."""
    n = atoms.shape[0]
    for q in prange(todo.shape[0]):
        t = todo[q]
        c, u, r = corr[t], bits[t], resid[t]
        nx = np.sqrt(_dot(x[t], x[t]))
        s = step[t]
        if s == 0:
            r[:] = x[t]
            bound = (x.shape[1] + 2) * eps * nx * 2
        else:
            j = idx[t, s - 1]
            sl = slot[j]
            if sl < 0:
                need[t] = j
                continue
            w = val[t, s - 1] * scale
            row = rows[sl]
            for i in range(n):
                c[i] -= w * row[i]
            bound = bounds[t]
        _block_max(u, mask, n, bmax[t])
        s, bound, nd = _mp_token(
            c,
            u,
            mask,
            n,
            r,
            atoms,
            rows,
            slot,
            scale,
            u_row,
            eps,
            nx,
            k,
            s,
            bound,
            idx[t],
            val[t],
            bmax[t],
            scr[t],
            sbits[t],
            maxcand,
            -1.0,
            stats[t],
        )
        step[t] = s
        bounds[t] = bound
        need[t] = nd


@njit(fastmath=FASTMATH, cache=True)
def exact_mp(
    x,
    corr0,
    n0,
    n,
    atoms,
    rows,
    slot,
    owner,
    u_row,
    eps,
    k,
    maxcand,
    threshold,
    early,
    pos,
    cutoff,
    patience,
    max_new,
    start,
    step0,
    bound0,
    c,
    bits,
    mask,
    cinit,
    r,
    idx,
    val,
    bmax,
    scr,
    sbits,
    stats,
    uses,
    accepted,
):  # pragma: no cover - jitted
    """ITDA's exact add rule with MP over a sub-batch, one token at a time in stream order.

    ``x`` [T, d] are the rows, ``corr0`` [T, n0] their correlations with the ``n0`` atoms at the
    sub-batch start (one matmul outside); ``n`` atoms exist when row ``start`` is read (the call
    resumes there after a stall). ``atoms`` [cap, d] and the int16 ``rows`` are written in place
    as atoms are added: the new atom's entry in every held row, and its own row when it has a
    slot (``slot``/``owner``; a full plan has ``rows.shape[0] >= cap``). Row t is read iff
    ``pos[t] <= cutoff``; each addition moves the cutoff to ``pos + patience`` (``patience < 0``:
    never). Stops after ``max_new`` additions in the sub-batch. A token is rejected as soon as its
    residual guarantees ``cos >= early``. Writes added rows' indices into ``accepted``; returns
    (atoms added so far, next row to read, cutoff, need, step, bound): ``need >= 0`` is an atom
    whose Gram row must be computed before resuming; the call that resumes passes that row as
    ``start`` with ``step0``/``bound0`` = the returned step and bound, and the token's pursuit
    continues where it stopped (its work rows ``c``, ``cinit``, ``r``, ``idx``, ``val``, ``bmax``
    kept). ``uses`` counts each atom's picks (the row cache keeps the most used rows).
    """
    T, d = x.shape
    full = rows.shape[0] >= atoms.shape[0]
    added = n - n0
    scale = 1.0 / QSCALE
    for t in range(start, T):
        if pos[t] > cutoff:
            return added, t, cutoff, -1, 0, 0.0
        xt = x[t]
        xx = _dot(xt, xt)
        nx = np.sqrt(xx)
        accept = n == 0
        if not accept:
            s = 0
            if t == start and step0 > 0:  # resume after a missing row: apply its update
                s, bound = step0, bound0
                w = val[s - 1] * scale
                row = rows[slot[idx[s - 1]]]
                for i in range(n):
                    c[i] -= w * row[i]
            else:
                for i in range(n0):
                    cinit[i] = corr0[t, i]
                for i in range(n0, n):
                    cinit[i] = _dot(xt, atoms[i])
                for i in range(n):
                    c[i] = cinit[i]
                r[:] = xt
                bound = (d + 2) * eps * nx * 2
            _block_max(bits, mask, n, bmax)
            # cos(x, x - r) >= sqrt(1 - |r|^2/|x|^2): once |r|^2 is that small the verdict is in
            stop_rr = (1.0 - early * early) * xx if 0.0 < early < 1.0 else -1.0
            s, bound, nd = _mp_token(
                c,
                bits,
                mask,
                n,
                r,
                atoms,
                rows,
                slot,
                scale,
                u_row,
                eps,
                nx,
                k,
                s,
                bound,
                idx,
                val,
                bmax,
                scr,
                sbits,
                maxcand,
                stop_rr,
                stats,
            )
            if nd >= 0:
                return added, t, cutoff, nd, s, bound
            for i in range(s):
                uses[idx[i]] += 1
            if nd == -1:
                rr = _dot(r, r)
                xr = _dot(xt, r)
                rec = xx - 2 * xr + rr  # |x - r|^2
                cos = (xx - xr) / max(nx * np.sqrt(max(rec, 0.0)), 1e-30)
                accept = cos < threshold
        if accept:
            inv = 1.0 / nx
            for i in range(d):
                atoms[n, i] = xt[i] * inv
            # Gram entries of the new atom: <x, a_i> / |x| (its correlations, already computed)
            for s_ in range(rows.shape[0]):
                o = owner[s_]
                if o >= 0:
                    g = min(1.0, max(-1.0, cinit[o] * inv))
                    rows[s_, n] = np.int16(np.rint(g * QSCALE))
            if full:
                for i in range(n):
                    g = min(1.0, max(-1.0, cinit[i] * inv))
                    rows[n, i] = np.int16(np.rint(g * QSCALE))
                rows[n, n] = np.int16(QSCALE)
                slot[n] = n
                owner[n] = n
            accepted[added] = t
            added += 1
            n += 1
            if patience >= 0:
                cutoff = pos[t] + patience
            if added == max_new:
                return added, t + 1, cutoff, -1, 0, 0.0
    return added, T, cutoff, -1, 0, 0.0
