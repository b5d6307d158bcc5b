"""Pursuit kernels: sparse codes of activations over a dictionary of unit-norm atoms.

Both encoders return a :class:`SparseCode` — ``(indices, values)`` of shape ``[..., k]`` — never a
dense tokens x atoms matrix (ask for one with :meth:`SparseCode.to_dense`):

* :func:`matching_pursuit` is ITDA's encoder as the paper's code runs it: exactly ``k`` iterations,
  each picks the atom with the largest ``|correlation|`` with the residual, records the *signed*
  correlation and subtracts it; an atom may be picked again (its slots then add up).
* :func:`orthogonal_matching_pursuit` picks atoms the same way but refits all coefficients by least
  squares over the support after each step (incremental Cholesky), with scikit-learn's
  ``orthogonal_mp_gram`` semantics, including its early stop on linear dependence.

Slots that carry no atom (OMP stopped early, or a zero input) have value 0 and index 0.

Work is done in chunks of tokens sized by a memory budget, so at most one chunk's tokens x atoms
buffers exist at a time. With a Gram matrix ``G = atoms @ atoms.T`` (built automatically while it
fits 1 GiB and pays for itself) MP runs in correlation space: one matmul per token, then ``k`` row
updates ``c -= v * G[j]`` (n·d + k·n work per token instead of the reference's k·n·d); on CPU a
fused numba kernel (:mod:`itda_lens._kernels`) does each step in two cache-resident passes. Past
the budget it updates residuals (k chunked matmuls). This module knows only torch (and numpy/numba
for the CPU kernel).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

try:  # the fused CPU kernel; without numba the same algorithm runs on torch ops
    from itda_lens import _kernels
except ImportError:  # pragma: no cover
    _kernels = None  # type: ignore[assignment]

__all__ = [
    "GRAM_MAX_BYTES",
    "UNIT_NORM_TOL",
    "OMPTrace",
    "SparseCode",
    "check_atoms",
    "check_k",
    "compute_dtype",
    "decode",
    "gram_max_atoms",
    "matching_pursuit",
    "mp_values",
    "omp_values",
    "orthogonal_matching_pursuit",
    "pursue",
    "reference_matching_pursuit",
]

#: Working-memory budget for one chunk of tokens (bytes): small enough that a chunk's [T, n]
#: buffers stay in cache across the k steps, which is what makes the Gram path fast on CPUs.
CHUNK_BYTES = 8 * 2**20
#: Chunk budget for paths that gain from big chunks (fused kernel, residual updates, GPUs, OMP).
LARGE_CHUNK_BYTES = 128 * 2**20
#: Fewest tokens per chunk, so that per-step dispatch overhead stays small for huge dictionaries.
MIN_CHUNK = 16
#: Chunks of at most this many tokens run the fused kernel on one thread.
SERIAL_TOKENS = 32
#: Largest Gram matrix built automatically (bytes); 1 GiB is 16,384 fp32 atoms.
GRAM_MAX_BYTES = 2**30
#: Allowed |norm - 1| of an atom: loose enough for half-precision rounding, tight enough to catch
#: dictionaries that were never normalised.
UNIT_NORM_TOL = 1e-2


GramArg = Tensor | None | Literal["auto"]


class OMPTrace(NamedTuple):
    """What OMP saw at each step, for testing whether a new atom would change its path.

    ``peaks[..., t]`` is the |correlation| of step t's pick with the residual (``inf`` once the
    pursuit stopped early); ``coefs[..., t, :t]`` are the coefficients over the first t picks that
    made that residual. A new atom ``a`` enters the path iff ``|<x, a> - coefs[t] . G[picks, a]|``
    exceeds ``peaks[t]`` at some step (ties go to the older atom).
    """

    peaks: Float[Tensor, "*batch k"]
    coefs: Float[Tensor, "*batch k k"]


class SparseCode(NamedTuple):
    """Sparse codes: ``k`` (atom index, coefficient) slots per input vector."""

    indices: Int[Tensor, "*batch k"]
    values: Float[Tensor, "*batch k"]

    def to_dense(self, n_atoms: int) -> Float[Tensor, "*batch n_atoms"]:
        """Dense codes; slots naming the same atom add up (MP may pick an atom twice)."""
        out = self.values.new_zeros(*self.values.shape[:-1], n_atoms)
        return out.scatter_add_(-1, self.indices, self.values)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: the promoted input dtype, but never below float32."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_k(k: object, name: str = "k") -> int:
    """``k`` must be an int >= 1 (bools refused); returns it."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    return k


def gram_max_atoms(dtype: torch.dtype, budget: int | None = None) -> int:
    """Most atoms whose ``n x n`` Gram matrix in ``dtype`` fits the budget (default
    ``GRAM_MAX_BYTES``, read at call time)."""
    budget = GRAM_MAX_BYTES if budget is None else budget
    return math.isqrt(budget * 8 // torch.finfo(dtype).bits)


def check_atoms(atoms: Tensor, *, unit: bool = True) -> None:
    """Raise if ``atoms`` is not a non-empty, finite [n, d] float matrix (with unit-norm rows,
    unless ``unit=False``)."""
    if not isinstance(atoms, Tensor) or not atoms.is_floating_point():
        raise TypeError(
            f"atoms must be a floating-point tensor, got {type(atoms).__name__}"
            + (f" of dtype {atoms.dtype}" if isinstance(atoms, Tensor) else "")
        )
    if atoms.ndim != 2:
        raise ValueError(f"atoms must have shape [n_atoms, d], got {tuple(atoms.shape)}")
    if atoms.shape[0] == 0:
        raise ValueError("empty dictionary: atoms has 0 rows; build or add atoms before encoding")
    if not bool(torch.isfinite(atoms).all()):
        raise ValueError("atoms contain NaN or Inf")
    if not unit:
        return
    dev = (atoms.float().norm(dim=1) - 1).abs().max().item()
    if dev > UNIT_NORM_TOL:
        raise ValueError(
            f"atoms must have unit L2 norm (max |norm - 1| = {dev:.3g}); "
            "normalise them first, e.g. torch.nn.functional.normalize(atoms, dim=1)"
        )


def _check_inputs(x: Tensor, atoms: Tensor, k: int, gram: GramArg) -> None:
    check_k(k)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            "x must be a floating-point tensor of activations, got "
            + (f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__)
        )
    check_atoms(atoms)
    if x.shape[-1:] != atoms.shape[1:]:
        raise ValueError(
            f"d_in mismatch: x has last dimension {x.shape[-1] if x.ndim else None} "
            f"but the atoms have dimension {atoms.shape[1]}"
        )
    if x.device != atoms.device:
        raise ValueError(f"x is on {x.device} but atoms are on {atoms.device}; move one of them")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf activations")
    if isinstance(gram, Tensor) and gram.shape != (atoms.shape[0], atoms.shape[0]):
        raise ValueError(f"gram must have shape {(atoms.shape[0],) * 2}, got {tuple(gram.shape)}")
    if gram is not None and not isinstance(gram, Tensor) and gram != "auto":
        raise ValueError(f"gram must be a tensor, None or 'auto', got {gram!r}")


def _resolve_gram(
    gram: GramArg, atoms: Tensor, n_tokens: int, k: int, dtype: torch.dtype
) -> Tensor | None:
    """A given Gram matrix; for 'auto', build one when it fits the budget and pays for itself.

    Past the budget (n > 16,384 fp32 atoms at 1 GiB) pursuit updates the residual instead: k
    chunked matmuls, no n x n matrix and no dense codes.
    """
    if isinstance(gram, Tensor):
        return gram.to(dtype)
    if gram is None:
        return None
    n = atoms.shape[0]
    fits = n <= gram_max_atoms(dtype)
    pays = n_tokens * k >= n  # n²·d to build it vs. the (k-1)·n·d per token it saves
    return atoms @ atoms.T if fits and pays else None


def _chunk_size(kind: str, k: int, atoms: Tensor, gram: Tensor | None, probe: Tensor) -> int:
    """Tokens per chunk from a working-set budget that depends on the path.

    On CPU the torch Gram path wants its [T, n] buffers (correlations, |correlations|, gathered
    Gram rows) to stay in cache across the k steps; the fused kernel and the residual path (which
    re-reads every atom each step) want large chunks; OMP also holds k gathered rows per token.
    """
    n, item = atoms.shape[0], atoms.element_size()
    if kind == "omp":
        per_token, budget = (k + 4) * n * item, LARGE_CHUNK_BYTES
    elif _fused_ok(probe, gram) or gram is None:
        per_token, budget = 2 * n * item, LARGE_CHUNK_BYTES
    else:
        per_token = 3 * n * item
        budget = CHUNK_BYTES if atoms.device.type == "cpu" else LARGE_CHUNK_BYTES
    return max(MIN_CHUNK, budget // per_token)


def _mp_chunk(x: Tensor, atoms: Tensor, k: int, gram: Tensor | None) -> tuple[Tensor, Tensor]:
    """MP on one chunk [T, d] in compute dtype; Gram path updates correlations, else the residual.

    The [T, n] work buffers are allocated once per chunk and reused by every step.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    val = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    corr = x @ atoms.T
    mag = torch.empty_like(corr)
    if _fused_ok(corr, gram):
        return _mp_fused(corr, gram, k)  # type: ignore[arg-type]
    if gram is not None:
        picked = torch.empty_like(corr)
        for t in range(k):
            j = torch.abs(corr, out=mag).argmax(dim=1)
            v = corr[rows, j]
            idx[:, t], val[:, t] = j, v
            g = torch.index_select(gram, 0, j, out=picked)
            corr.addcmul_(g, v.unsqueeze(1), value=-1.0)
    else:
        resid = x.clone()
        for t in range(k):
            if t:
                torch.matmul(resid, atoms.T, out=corr)
            j = torch.abs(corr, out=mag).argmax(dim=1)
            v = corr[rows, j]
            idx[:, t], val[:, t] = j, v
            resid.addcmul_(atoms.index_select(0, j), v.unsqueeze(1), value=-1.0)
    return idx, val


def _fused_ok(corr: Tensor, gram: Tensor | None) -> bool:
    """The numba kernel runs on CPU fp32/fp64 with a full Gram matrix whose rows are contiguous."""
    return (
        _kernels is not None
        and isinstance(gram, Tensor)
        and corr.device.type == "cpu"
        and corr.dtype in (torch.float32, torch.float64)
        and gram.dtype == corr.dtype
        and gram.stride(1) == 1
    )


def _mp_fused(corr: Tensor, gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    n = gram.shape[0]
    c = corr.contiguous().numpy()
    bits = c.view(np.int32 if c.dtype == np.float32 else np.int64)
    mask = bits.dtype.type(np.iinfo(bits.dtype).max)  # clears the sign bit: |c| order
    flat = gram.as_strided((gram.stride(0) * (n - 1) + n,), (1,), gram.storage_offset()).numpy()
    idx = np.empty((c.shape[0], k), dtype=np.int64)
    val = np.empty((c.shape[0], k), dtype=c.dtype)
    kernel = _kernels.mp_gram if c.shape[0] > SERIAL_TOKENS else _kernels.mp_gram_serial
    kernel(c, bits, flat, gram.stride(0), k, mask, idx, val)
    return torch.from_numpy(idx), torch.from_numpy(val)


def _omp_chunk(
    x: Tensor, atoms: Tensor, k: int, gram: Tensor | None, trace: OMPTrace | None = None
) -> tuple[Tensor, Tensor]:
    """Batched OMP (Cholesky of the support Gram, grown one row per step) on one chunk [T, d].

    With ``trace``, also records for each step the |correlation| of the pick with the residual
    (``inf`` after an early stop) and the coefficients that made that residual (see OMPTrace).
    """
    T, n = x.shape[0], atoms.shape[0]
    dev, dt = x.device, x.dtype
    eps = torch.finfo(dt).eps
    rows = torch.arange(T, device=dev)
    c0 = x @ atoms.T
    alpha = c0.clone()
    idx = torch.zeros(T, k, dtype=torch.long, device=dev)
    live = torch.zeros(T, k, dtype=torch.bool, device=dev)
    chol = torch.zeros(T, k, k, dtype=dt, device=dev)
    g_rows = torch.zeros(T, k, n, dtype=dt, device=dev)
    active = torch.ones(T, dtype=torch.bool, device=dev)
    scale = (x * x).sum(dim=1)
    gamma = torch.zeros(T, 1, dtype=dt, device=dev)
    for t in range(k):
        j = alpha.abs().argmax(dim=1)
        a = alpha[rows, j]
        g = gram.index_select(0, j) if gram is not None else atoms.index_select(0, j) @ atoms.T
        # sklearn stops when the pick is already in the support or its correlation vanishes;
        # we scale the "vanishes" test by |x|^2 so that small-norm inputs are not cut off.
        stop = (a * a) <= eps * scale
        if t > 0:
            stop |= (idx[:, :t] == j.unsqueeze(1)).any(dim=1) & live[:, t - 1]
            b = g.gather(1, idx[:, :t]) * live[:, :t]
            w = torch.linalg.solve_triangular(
                chol[:, :t, :t], b.unsqueeze(-1), upper=False
            ).squeeze(-1)
            lkk = g[rows, j] - (w * w).sum(dim=1)
            stop |= lkk <= eps
        else:
            w = None
            lkk = g[rows, j]
        if trace is not None:  # the residual before this step: x - atoms[idx[:, :t]] @ gamma
            entering = live[:, t - 1] if t else torch.ones_like(active)
            trace.peaks[:, t] = torch.where(entering, a.abs(), torch.inf)
            if t:
                trace.coefs[:, t, :t] = gamma
        active &= ~stop
        live[:, t] = active
        idx[:, t] = torch.where(active, j, 0)
        if w is not None:
            chol[:, t, :t] = w * active.unsqueeze(1)
        chol[:, t, t] = torch.where(active, lkk.clamp_min(eps).sqrt(), 1.0)
        g_rows[:, t] = g * active.unsqueeze(1)
        rhs = c0.gather(1, idx[:, : t + 1]) * live[:, : t + 1]
        gamma = torch.cholesky_solve(rhs.unsqueeze(-1), chol[:, : t + 1, : t + 1]).squeeze(-1)
        if t + 1 < k:
            alpha = c0 - torch.bmm(gamma.unsqueeze(1), g_rows[:, : t + 1]).squeeze(1)
    return idx, gamma * live


def _pursue(
    kind: str, x: Tensor, atoms: Tensor, k: int, gram: GramArg, chunk_size: int | None
) -> SparseCode:
    _check_inputs(x, atoms, k, gram)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return pursue(kind, x, atoms, k, gram=gram, chunk_size=chunk_size)[0]


def pursue(
    kind: Literal["mp", "omp"],
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
    trace: bool = False,
) -> tuple[SparseCode, OMPTrace | None]:
    """MP or OMP without input validation, for callers that own their atoms (the builder).

    ``trace=True`` (OMP only) also returns the per-step :class:`OMPTrace`.
    """
    dt = compute_dtype(x.dtype, atoms.dtype)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    a = atoms.to(dt)
    g = _resolve_gram(gram, a, flat.shape[0], k, dt)
    idx = torch.empty(flat.shape[0], k, dtype=torch.long, device=x.device)
    val = torch.empty(flat.shape[0], k, dtype=x.dtype, device=x.device)
    tr = None
    if trace:
        if kind != "omp":
            raise ValueError(
                "trace is for OMP; MP's peaks are |values| and its coefs are cumulative"
            )
        tr = OMPTrace(
            torch.empty(flat.shape[0], k, dtype=dt, device=x.device),
            torch.zeros(flat.shape[0], k, k, dtype=dt, device=x.device),
        )
    with torch.no_grad():
        size = chunk_size or _chunk_size(kind, k, a, g, flat[:0].to(dt))
        for start in range(0, flat.shape[0], size):
            sl = slice(start, start + size)
            if kind == "mp":
                i, v = _mp_chunk(flat[sl].to(dt), a, k, g)
            else:
                part = None if tr is None else OMPTrace(tr.peaks[sl], tr.coefs[sl])
                i, v = _omp_chunk(flat[sl].to(dt), a, k, g, part)
            idx[sl], val[sl] = i, v.to(x.dtype)
    code = SparseCode(idx.reshape(*lead, k), val.reshape(*lead, k))
    if tr is not None:
        tr = OMPTrace(tr.peaks.reshape(*lead, k), tr.coefs.reshape(*lead, k, k))
    return code, tr


def matching_pursuit(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
) -> SparseCode:
    """Signed matching pursuit with exactly ``k`` iterations (ITDA's encoder).

    ``atoms`` must have unit-norm rows. ``gram`` may be a precomputed ``atoms @ atoms.T``, ``None``
    (residual updates, no n x n matrix) or ``"auto"`` (build one when it fits and pays off).
    Returns ``(indices, values)`` of shape ``[*batch, k]``, slots in selection order.
    """
    return _pursue("mp", x, atoms, k, gram, chunk_size)


def orthogonal_matching_pursuit(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
) -> SparseCode:
    """Orthogonal matching pursuit with at most ``k`` atoms (least-squares refit each step).

    Matches ``sklearn.linear_model.orthogonal_mp_gram(G, atoms @ x, n_nonzero_coefs=k)``: the same
    supports in the same order and the same coefficients, including its early stop when the next
    atom is already in the support or linearly dependent on it. Unused slots have value 0.
    """
    return _pursue("omp", x, atoms, k, gram, chunk_size)


def decode(code: SparseCode, atoms: Float[Tensor, "n d"]) -> Float[Tensor, "*batch d"]:
    """Reconstruction ``sum_t values[..., t] * atoms[indices[..., t]]`` without a dense code matrix."""
    k = code.indices.shape[-1]
    lead = code.indices.shape[:-1]
    out = F.embedding_bag(
        code.indices.reshape(-1, k),
        atoms,
        per_sample_weights=code.values.reshape(-1, k).to(atoms.dtype),
        mode="sum",
    )
    return out.reshape(*lead, atoms.shape[1])


def mp_values(
    x: Float[Tensor, "*batch d"], atoms: Float[Tensor, "n d"], indices: Int[Tensor, "*batch k"]
) -> Float[Tensor, "*batch k"]:
    """MP coefficients for a given selection order, as a differentiable function of ``x``.

    Given the picks ``j_1..j_k``, MP's coefficients solve the unit lower-triangular system
    ``v_t + sum_{s<t} <a_jt, a_js> v_s = <a_jt, x>``; this lets gradients flow through ``encode``.
    """
    sel = atoms[indices]  # [*batch, k, d]
    b = (sel @ x.unsqueeze(-1)).squeeze(-1)
    lower = torch.tril(sel @ sel.transpose(-1, -2), diagonal=-1)
    eye = torch.eye(indices.shape[-1], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(
        lower + eye, b.unsqueeze(-1), upper=False, unitriangular=True
    ).squeeze(-1)


def omp_values(
    x: Float[Tensor, "*batch d"], atoms: Float[Tensor, "n d"], code: SparseCode
) -> Float[Tensor, "*batch k"]:
    """OMP's least-squares coefficients over a given support, differentiable in ``x``.

    Slots whose value is exactly 0 are treated as unused (identity rows in the normal equations).
    """
    live = code.values != 0
    sel = atoms[code.indices] * live.unsqueeze(-1)
    gram = sel @ sel.transpose(-1, -2)
    gram = gram + torch.diag_embed((~live).to(gram.dtype))
    b = (sel @ x.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.solve(gram, b.unsqueeze(-1)).squeeze(-1)


def reference_matching_pursuit(
    x: Float[Tensor, "tokens d"], atoms: Float[Tensor, "n d"], k: int
) -> Float[Tensor, "tokens n"]:
    """The paper's Algorithm 2, literally: ``k`` full matmuls per batch and dense codes.

    Slow and memory-hungry by design; it is the yardstick for tests and benchmarks.
    """
    resid = x.clone()
    codes = x.new_zeros(x.shape[0], atoms.shape[0])
    rows = torch.arange(x.shape[0], device=x.device)
    for _ in range(k):
        corr = resid @ atoms.T
        best = corr.abs().argmax(dim=-1)
        coef = corr[rows, best]
        codes[rows, best] += coef
        resid = resid - coef[:, None] * atoms[best]
    return codes
