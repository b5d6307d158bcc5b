"""Pursuit kernels: sparse codes of activations over a dictionary of unit-norm atoms.

The encoders return a :class:`SparseCode` — ``(indices, values)`` of shape ``[..., k]`` — never a
dense tokens x atoms matrix (ask for one with :meth:`SparseCode.to_dense`):

* :func:`matching_pursuit` is ITDA's encoder as the paper's code runs it: exactly ``k`` iterations,
  each picks the atom with the largest ``|correlation|`` with the residual, records the *signed*
  correlation and subtracts it; an atom may be picked again (its slots then add up).
* :func:`orthogonal_matching_pursuit` picks atoms the same way but refits all coefficients by least
  squares over the support after each step (incremental Cholesky), with scikit-learn's
  ``orthogonal_mp_gram`` semantics, including its early stop on linear dependence.
* :func:`gradient_pursuit` is *non-negative* gradient pursuit (Blumensath & Davies 2008, as the
  GDM team, EleutherAI sparsify's ITDA and dictionary_learning run it): each step adds the atom
  with the largest *positive* correlation to the support, takes one exact line-search step along
  the correlations on the support and clamps the coefficients at 0. It recomputes the
  correlations from the residual each step (Gram rows do not apply: every step moves all of the
  support's coefficients) and has no CPU kernel.

Slots that carry no atom (OMP stopped early, a gradient-pursuit coefficient clamped to 0, or a
zero input) have value 0 and index 0.

How it is fast at any size: one matmul gives each token's correlations with every atom; each step
then updates them with the picked atom's Gram row (n work instead of n·d). The rows are int16
(:class:`~itda_lens.gram.GramRows`): all of them when the Gram matrix fits the memory budget
(:mod:`itda_lens.budget`), else a cache of the most used rows, computed on demand in one GEMM for
the atoms a chunk picks. Rows only *propose*: every token also keeps its residual, and each step
checks the atoms whose approximate correlation is within the rows' error bound of the best by an
exact dot product, so the picks and coefficients are the literal algorithm's up to floating-point
rounding (exact ties aside), however coarse or incomplete the rows. On CPU a numba kernel
(:mod:`itda_lens.kernels`) runs each token's ``k`` steps in cache; elsewhere (GPUs) the same
algorithm runs step by step on torch ops over the whole chunk. This module knows only torch (and
numpy/numba for the CPU kernel).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from itda_lens.budget import memory_budget
from itda_lens.gram import GramRows

try:  # the CPU kernels; without numba the same algorithm runs on torch ops
    from itda_lens import kernels
except ImportError:  # pragma: no cover
    kernels = None  # type: ignore[assignment]

__all__ = [
    "ENCODERS",
    "UNIT_NORM_TOL",
    "Backend",
    "Encoder",
    "GPTrace",
    "OMPTrace",
    "PursuitStats",
    "SparseCode",
    "check_atoms",
    "check_k",
    "chunk_tokens",
    "compute_dtype",
    "decode",
    "gp_values",
    "gradient_pursuit",
    "matching_pursuit",
    "mp_values",
    "omp_values",
    "orthogonal_matching_pursuit",
    "plan_rows",
    "pursue",
    "pursue_gp",
    "reference_matching_pursuit",
]

#: Chunk buffers (a chunk's [T, n] correlations and work rows) may take this share of the budget,
#: and at most these many bytes (CPU; GPUs take the larger bound).
CHUNK_SHARE = 0.25
CHUNK_BYTES = {"cpu": 256 * 2**20, "other": 2 * 2**30}
#: Fewest / most tokens per chunk.
MIN_CHUNK, MAX_CHUNK = 16, 16384
#: Chunks of at most this many tokens run the CPU kernel on one thread.
SERIAL_TOKENS = 32
#: Candidates checked exactly per step before correlations are refreshed from the residual
#: (CPU kernel), and candidates the torch path takes per step (top-m of |c|).
MAX_CANDIDATES = 64
TORCH_CANDIDATES = 8
#: Allowed |norm - 1| of an atom: loose enough for half-precision rounding, tight enough to catch
#: dictionaries that were never normalised.
UNIT_NORM_TOL = 1e-2

Backend = Literal["auto", "kernel", "torch"]
#: The pursuits an ITDA may encode with: matching pursuit (ITDA's), OMP, non-negative gradient
#: pursuit.
Encoder = Literal["mp", "omp", "gp"]
ENCODERS: tuple[Encoder, ...] = ("mp", "omp", "gp")
GramArg = Tensor | GramRows | None | Literal["auto"]


class OMPTrace(NamedTuple):
    """What OMP saw at each step, for testing whether a new atom would change its path.

    ``peaks[..., t]`` is the |correlation| of step t's pick with the residual (``inf`` once the
    pursuit stopped early); ``coefs[..., t, :t]`` are the coefficients over the first t picks that
    made that residual. A new atom ``a`` enters the path iff ``|<x, a> - coefs[t] . G[picks, a]|``
    exceeds ``peaks[t]`` at some step (ties go to the older atom).
    """

    peaks: Float[Tensor, "*batch k"]
    coefs: Float[Tensor, "*batch k k"]


class GPTrace(NamedTuple):
    """Gradient pursuit's path, to replay it as a differentiable function of the input
    (:func:`gp_values`).

    Slots hold the distinct atoms picked, in the order of their first pick: ``atoms[..., s]`` is
    slot s's atom (0 for a slot no pick reached); ``picks[..., t]`` is the slot step t picked;
    ``alive[..., t, s]`` says whether slot s's coefficient was non-zero after step t.
    """

    atoms: Int[Tensor, "*batch k"]
    picks: Int[Tensor, "*batch k"]
    alive: Bool[Tensor, "*batch k k"]


class SparseCode(NamedTuple):
    """Sparse codes: ``k`` (atom index, coefficient) slots per input vector."""

    indices: Int[Tensor, "*batch k"]
    values: Float[Tensor, "*batch k"]

    def to_dense(self, n_atoms: int) -> Float[Tensor, "*batch n_atoms"]:
        """Dense codes; slots naming the same atom add up (MP may pick an atom twice)."""
        out = self.values.new_zeros(*self.values.shape[:-1], n_atoms)
        return out.scatter_add_(-1, self.indices, self.values)


class PursuitStats:
    """Counters a caller may pass to see how the pursuit went (for benchmarks and tests)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.steps = 0
        self.candidates = 0  # atoms checked exactly
        self.refreshes = 0  # steps whose correlations were recomputed from the residual
        self.rounds = 0  # kernel calls (stalled tokens resume in the next)
        self.rows_computed = 0  # Gram rows computed on demand
        self.chunk = 0  # tokens per chunk
        self.full_gram = False

    def as_dict(self) -> dict[str, float | int | bool]:
        return dict(vars(self))


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
    if isinstance(gram, GramRows) and gram.n != atoms.shape[0]:
        raise ValueError(f"gram holds rows of {gram.n} atoms, but there are {atoms.shape[0]}")
    if (
        gram is not None
        and not isinstance(gram, Tensor | GramRows)
        and not (isinstance(gram, str) and gram == "auto")
    ):
        raise ValueError(f"gram must be a tensor, GramRows, None or 'auto', got {gram!r}")


def _chunk_bytes(device: torch.device, budget: int) -> int:
    cap = CHUNK_BYTES["cpu" if device.type == "cpu" else "other"]
    return max(2**16, min(cap, int(budget * CHUNK_SHARE)))


def plan_rows(
    atoms: Float[Tensor, "n d"], n_tokens: int, k: int, budget: int | float | str | None = None
) -> GramRows:
    """The Gram rows pursuit of ``n_tokens`` tokens over ``atoms`` should use: every row when the
    int16 Gram fits the budget (less the chunk buffers) and pays for itself (``n_tokens * k >= n``:
    building it costs n²·d, each token saves about k·n·d), else a cache filled on demand."""
    total = memory_budget(atoms.device, budget)
    rows_budget = total - _chunk_bytes(atoms.device, total)
    n = atoms.shape[0]
    fits = n <= GramRows.max_full_atoms(rows_budget)
    pays = n_tokens * k >= n
    if fits and pays:
        return GramRows.for_atoms(atoms, rows_budget)
    cache = GramRows.for_atoms(atoms, min(rows_budget, GramRows.row_bytes(n) * (n - 1)), fill=False)
    return cache


def _resolve_rows(
    gram: GramArg, atoms: Tensor, n_tokens: int, k: int, budget: int | float | str | None
) -> GramRows | None:
    if isinstance(gram, GramRows):
        return gram
    if isinstance(gram, Tensor):
        return GramRows.from_gram(gram.to(atoms.dtype), atoms.shape[1])
    if gram is None:
        return None
    return plan_rows(atoms, n_tokens, k, budget)


def _use_kernel(backend: Backend, x: Tensor, rows: GramRows | None, kind: str) -> bool:
    ok = (
        kernels is not None
        and kind == "mp"
        and rows is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (rows.quantized or rows.q.dtype == x.dtype)
    )
    if backend == "kernel" and not ok:
        raise ValueError(
            "backend='kernel' needs numba, MP, CPU float32/float64 and Gram rows (gram not None)"
        )
    return ok and backend != "torch"


def chunk_tokens(kind: str, k: int, n: int, item: int, device: torch.device, budget: int) -> int:
    """Tokens per chunk from the chunk share of the budget: the kernel holds [T, n] correlations;
    the torch MP path about three [T, n] buffers; OMP also k gathered rows per token; gradient
    pursuit its correlations and their argmax."""
    per_token = {
        "kernel": n * item, "mp": 3 * n * item, "omp": (k + 4) * n * item, "gp": 2 * n * item
    }[kind]  # fmt: skip
    return int(min(MAX_CHUNK, max(MIN_CHUNK, _chunk_bytes(device, budget) // per_token)))


def _fresh_bound(x: Tensor, eps: float) -> Tensor:
    """Error bound of correlations computed by one dot product per atom: 2 (d + 2) eps |x|."""
    return x.norm(dim=1) * (2 * (x.shape[1] + 2) * eps)


def _mp_kernel(
    x: Tensor, atoms: Tensor, k: int, rows: GramRows, stats: PursuitStats
) -> tuple[Tensor, Tensor]:
    """MP on one chunk [T, d] by the CPU kernel; stalled tokens resume once the rows they wait
    for are computed (one GEMM per round)."""
    T, d = x.shape
    n = atoms.shape[0]
    corr = (x @ atoms.T).contiguous()
    c = corr.numpy()
    itype = np.int32 if c.dtype == np.float32 else np.int64
    bits = c.view(itype)
    mask = itype(np.iinfo(itype).max)
    step = np.zeros(T, dtype=np.int64)
    idx = np.zeros((T, k), dtype=np.int64)
    val = np.zeros((T, k), dtype=c.dtype)
    resid = np.empty((T, d), dtype=c.dtype)
    bounds = np.zeros(T, dtype=c.dtype)
    need = np.full(T, -1, dtype=np.int64)
    bmax = np.empty((T, (n + kernels.BLOCK - 1) // kernels.BLOCK), dtype=itype)
    scr = np.zeros((T, 1), dtype=c.dtype)
    counts = np.zeros((T, 2), dtype=np.int64)
    eps = float(torch.finfo(x.dtype).eps)
    todo = np.arange(T, dtype=np.int64)
    a = atoms.numpy()
    xs = x.numpy()
    while todo.size:
        stats.rounds += 1
        kernels.mp_rows(
            xs, c, bits, mask, a, rows.q.numpy(), rows.slot.numpy(), c.dtype.type(rows.scale),
            c.dtype.type(rows.error), c.dtype.type(eps), k, MAX_CANDIDATES, todo, step, idx,
            val, resid, bounds, need, bmax, scr, scr.view(itype), counts,
        )  # fmt: skip
        todo = np.flatnonzero(need >= 0)
        if todo.size:
            got = rows.ensure(torch.from_numpy(need[todo]), atoms)
            if got.numel() == 0:  # pragma: no cover - ensure always makes room for one
                raise RuntimeError("Gram row cache has no room for a single row")
            todo = todo[np.isin(need[todo], got.numpy())]
    rows.count(torch.from_numpy(idx))
    stats.candidates += int(counts[:, 0].sum())
    stats.refreshes += int(counts[:, 1].sum())
    return torch.from_numpy(idx), torch.from_numpy(val)


def _exact_picks(
    corr: Tensor, r: Tensor, atoms: Tensor, bound: Tensor, stats: PursuitStats
) -> tuple[Tensor, Tensor]:
    """The torch path's step: among the atoms whose approximate |correlation| is within
    ``2 * bound`` of the best, the largest exact ``|<r, a>|`` (first index on ties). Tokens with
    more candidates than the top-m covers get exact correlations for every atom instead."""
    n = corr.shape[1]
    m = min(TORCH_CANDIDATES, n)
    top = corr.abs().topk(m, dim=1)
    thr = top.values[:, 0] - 2 * bound
    cand = top.indices
    live = top.values >= thr.unsqueeze(1)
    exact = torch.bmm(atoms[cand], r.unsqueeze(2)).squeeze(2)
    score = torch.where(live, exact.abs(), -1.0)
    best = score.max(dim=1, keepdim=True).values
    pos = torch.where(score == best, cand, n).argmin(dim=1, keepdim=True)
    j = cand.gather(1, pos).squeeze(1)
    v = exact.gather(1, pos).squeeze(1)
    wide = ((thr <= 0) | live[:, -1]) & (m < n)
    stats.candidates += int(live.sum())
    if bool(wide.any()):
        w = wide.nonzero().flatten()
        stats.refreshes += w.numel()
        full = r[w] @ atoms.T
        corr[w] = full
        jw = full.abs().argmax(dim=1)
        j[w], v[w] = jw, full.gather(1, jw.unsqueeze(1)).squeeze(1)
        bound[w] = _fresh_bound(r[w], torch.finfo(r.dtype).eps)
    return j, v


def _mp_torch(
    x: Tensor, atoms: Tensor, k: int, rows: GramRows | None, stats: PursuitStats
) -> tuple[Tensor, Tensor]:
    """MP on one chunk [T, d] step by step on torch ops (the GPU path); without rows it is the
    literal algorithm (correlations recomputed from the residual every step)."""
    T = x.shape[0]
    eps = torch.finfo(x.dtype).eps
    idx = torch.empty(T, k, dtype=torch.long, device=x.device)
    val = torch.empty(T, k, dtype=x.dtype, device=x.device)
    r = x.clone()
    corr = x @ atoms.T
    nx = x.norm(dim=1)
    bound = _fresh_bound(x, eps)
    for s in range(k):
        if s and rows is not None:
            j_prev, v_prev = idx[:, s - 1], val[:, s - 1]
            corr.addcmul_(rows.rows_of(j_prev, atoms, x.dtype), v_prev.unsqueeze(1), value=-1.0)
        elif s:
            torch.matmul(r, atoms.T, out=corr)
        if rows is None:
            j = corr.abs().argmax(dim=1)
            v = corr.gather(1, j.unsqueeze(1)).squeeze(1)
        else:
            j, v = _exact_picks(corr, r, atoms, bound, stats)
            bound += v.abs() * (rows.error + 2 * eps) + 2 * eps * nx
        idx[:, s], val[:, s] = j, v
        r.addcmul_(atoms[j], v.unsqueeze(1), value=-1.0)
    if rows is not None:
        rows.count(idx)
    return idx, val


def _omp_chunk(
    x: Tensor,
    atoms: Tensor,
    k: int,
    rows: GramRows | None,
    stats: PursuitStats,
    trace: OMPTrace | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched OMP (Cholesky of the support Gram, grown one row per step) on one chunk [T, d].

    Correlations with the residual are ``c0 - G[:, S] gamma`` from the Gram rows of the support
    (or recomputed from the residual without rows); picks are checked exactly like MP's. With
    ``trace``, also records for each step the |correlation| of the pick with the residual (``inf``
    after an early stop) and the coefficients that made that residual (see OMPTrace).
    """
    T, n = x.shape[0], atoms.shape[0]
    dev, dt = x.device, x.dtype
    eps = torch.finfo(dt).eps
    rows_t = torch.arange(T, device=dev)
    c0 = x @ atoms.T
    alpha = c0.clone()
    idx = torch.zeros(T, k, dtype=torch.long, device=dev)
    live = torch.zeros(T, k, dtype=torch.bool, device=dev)
    chol = torch.zeros(T, k, k, dtype=dt, device=dev)
    g_rows = torch.zeros(T, k, n, dtype=dt, device=dev) if rows is not None else None
    active = torch.ones(T, dtype=torch.bool, device=dev)
    scale = (x * x).sum(dim=1)
    gamma = torch.zeros(T, 1, dtype=dt, device=dev)
    r = x.clone()
    bound = _fresh_bound(x, eps)
    for t in range(k):
        if rows is None:
            j = alpha.abs().argmax(dim=1)
            a = alpha[rows_t, j]
        else:
            j, a = _exact_picks(alpha, r, atoms, bound, stats)
        sel = atoms[idx[:, :t]]  # [T, t, d]
        # sklearn stops when the pick is already in the support or its correlation vanishes;
        # we scale the "vanishes" test by |x|^2 so that small-norm inputs are not cut off.
        stop = (a * a) <= eps * scale
        gjj = (atoms[j] * atoms[j]).sum(dim=1)
        if t > 0:
            stop |= (idx[:, :t] == j.unsqueeze(1)).any(dim=1) & live[:, t - 1]
            b = torch.bmm(sel, atoms[j].unsqueeze(2)).squeeze(2) * live[:, :t]
            w = torch.linalg.solve_triangular(
                chol[:, :t, :t], b.unsqueeze(-1), upper=False
            ).squeeze(-1)
            lkk = gjj - (w * w).sum(dim=1)
            stop |= lkk <= eps
        else:
            w = None
            lkk = gjj
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
        rhs = c0.gather(1, idx[:, : t + 1]) * live[:, : t + 1]
        gamma = torch.cholesky_solve(rhs.unsqueeze(-1), chol[:, : t + 1, : t + 1]).squeeze(-1)
        if t + 1 < k:
            sup = atoms[idx[:, : t + 1]] * live[:, : t + 1].unsqueeze(2)
            r = x - torch.bmm(gamma.unsqueeze(1), sup).squeeze(1)
            if rows is None:
                torch.matmul(r, atoms.T, out=alpha)
            else:
                assert g_rows is not None
                g_rows[:, t] = rows.rows_of(j, atoms, dt) * active.unsqueeze(1)
                alpha = c0 - torch.bmm(gamma.unsqueeze(1), g_rows[:, : t + 1]).squeeze(1)
                # |alpha - exact| <= c0's rounding + |gamma| . (row error + bmm rounding)
                bound = _fresh_bound(x, eps) + gamma.abs().sum(dim=1) * (rows.error + (t + 3) * eps)
    if rows is not None:
        rows.count(idx[live])
    return idx, gamma * live


def _pursue(
    kind: str,
    x: Tensor,
    atoms: Tensor,
    k: int,
    gram: GramArg,
    chunk_size: int | None,
    budget: int | float | str | None,
    backend: Backend,
    stats: PursuitStats | None,
) -> SparseCode:
    _check_inputs(x, atoms, k, gram)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'torch', got {backend!r}")
    return pursue(
        kind, x, atoms, k, gram=gram, chunk_size=chunk_size, budget=budget, backend=backend,
        stats=stats,
    )[0]  # fmt: skip


def pursue(
    kind: Encoder,
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
    trace: bool = False,
    budget: int | float | str | None = None,
    backend: Backend = "auto",
    stats: PursuitStats | None = None,
) -> tuple[SparseCode, OMPTrace | None]:
    """MP, OMP or gradient pursuit without input validation, for callers that own their atoms
    (the builder).

    ``trace=True`` (OMP only) also returns the per-step :class:`OMPTrace`; gradient pursuit's own
    trace comes from :func:`pursue_gp`. Gradient pursuit ignores ``gram`` (it reads no Gram rows).
    """
    if kind not in ENCODERS:
        raise ValueError(f"kind must be one of {ENCODERS}, got {kind!r}")
    if kind == "gp":
        if trace:
            raise ValueError("trace is for OMP; gradient pursuit's trace comes from pursue_gp")
        if backend == "kernel":
            raise ValueError("backend='kernel' needs numba, MP, CPU float32/float64 and Gram rows")
        code, _ = pursue_gp(x, atoms, k, chunk_size=chunk_size, budget=budget, stats=stats)
        return code, None
    dt = compute_dtype(x.dtype, atoms.dtype)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    a = atoms.to(dt)
    stats = stats if stats is not None else PursuitStats()
    total = memory_budget(x.device, budget)
    rows = _resolve_rows(gram, a, flat.shape[0], k, total)
    if rows is not None and not rows.quantized and rows.q.dtype != dt:
        rows = GramRows.from_gram(rows.q.to(dt), a.shape[1])
    kernel = _use_kernel(backend, flat[:0].to(dt), rows, kind)
    path = "kernel" if kernel else kind
    size = chunk_size or chunk_tokens(path, k, a.shape[0], a.element_size(), x.device, total)
    stats.chunk, stats.full_gram = size, rows is not None and rows.full
    computed0 = rows.computed if rows is not None else 0
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
        for start in range(0, flat.shape[0], size):
            sl = slice(start, start + size)
            xs = flat[sl].to(dt)
            if kernel:
                assert rows is not None
                threads = 1 if xs.shape[0] <= SERIAL_TOKENS else None
                with _numba_threads(threads):
                    i, v = _mp_kernel(xs, a, k, rows, stats)
            elif kind == "mp":
                i, v = _mp_torch(xs, a, k, rows, stats)
            else:
                part = None if tr is None else OMPTrace(tr.peaks[sl], tr.coefs[sl])
                i, v = _omp_chunk(xs, a, k, rows, stats, part)
            idx[sl], val[sl] = i, v.to(x.dtype)
    stats.tokens += flat.shape[0]
    stats.steps += flat.shape[0] * k
    if rows is not None:
        stats.rows_computed = max(stats.rows_computed, rows.computed - computed0)
    code = SparseCode(idx.reshape(*lead, k), val.reshape(*lead, k))
    if tr is not None:
        tr = OMPTrace(tr.peaks.reshape(*lead, k), tr.coefs.reshape(*lead, k, k))
    return code, tr


class _numba_threads:
    """Run a block with ``n`` numba threads (None: unchanged), keeping torch's intra-op thread count.

    numba's OpenMP threading layer starts its pool on first use (``numba.get_num_threads()`` or the
    first call of a ``parallel=True`` kernel) and then calls ``omp_set_num_threads(
    NUMBA_NUM_THREADS)`` (and ``omp_set_nested(1)``) on the calling thread. torch's CPU build uses
    the same OpenMP runtime, whose ``omp_get_max_threads()`` *is* ``torch.get_num_threads()``: a
    user's ``torch.set_num_threads(1)`` silently became the CPU count. The block restores torch's
    count if it changed (numba's own parallelism is unaffected: its kernels pass their thread count
    to each parallel region).
    """

    def __init__(self, n: int | None):
        self.n, self.before = n, None
        self.torch_threads = 0

    def __enter__(self) -> None:
        self.torch_threads = torch.get_num_threads()
        if self.n is not None and kernels is not None:
            import numba

            self.before = numba.get_num_threads()
            numba.set_num_threads(min(self.n, self.before))

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            import numba

            numba.set_num_threads(self.before)
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


def matching_pursuit(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
    budget: int | float | str | None = None,
    backend: Backend = "auto",
    stats: PursuitStats | None = None,
) -> SparseCode:
    """Signed matching pursuit with exactly ``k`` iterations (ITDA's encoder).

    ``atoms`` must have unit-norm rows. ``gram`` may be ``"auto"`` (int16 Gram rows planned from
    the memory ``budget``: all of them, or a cache), a :class:`~itda_lens.gram.GramRows` to reuse
    across calls, a precomputed float ``atoms @ atoms.T``, or ``None`` (the literal algorithm: k
    matmuls, no rows). ``backend="torch"`` runs the step-by-step torch path (what GPUs run) on CPU.
    Returns ``(indices, values)`` of shape ``[*batch, k]``, slots in selection order.
    """
    return _pursue("mp", x, atoms, k, gram, chunk_size, budget, backend, stats)


def orthogonal_matching_pursuit(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    gram: GramArg = "auto",
    chunk_size: int | None = None,
    budget: int | float | str | None = None,
    stats: PursuitStats | None = None,
) -> SparseCode:
    """Orthogonal matching pursuit with at most ``k`` atoms (least-squares refit each step).

    Matches ``sklearn.linear_model.orthogonal_mp_gram(G, atoms @ x, n_nonzero_coefs=k)``: the same
    supports in the same order and the same coefficients, including its early stop when the next
    atom is already in the support or linearly dependent on it. Unused slots have value 0.
    """
    return _pursue("omp", x, atoms, k, gram, chunk_size, budget, "auto", stats)


def gradient_pursuit(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    chunk_size: int | None = None,
    budget: int | float | str | None = None,
    stats: PursuitStats | None = None,
) -> SparseCode:
    """Non-negative gradient pursuit with exactly ``k`` steps (Blumensath & Davies, "Gradient
    Pursuits", IEEE TSP 56(6), 2008, restricted to non-negative coefficients).

    Transcribed from ``grad_pursuit_update_step`` / ``grad_pursuit`` in EleutherAI/sparsify's
    ``sparsify/itda.py`` (branch ``optimized-encoder``, commit 854c28f, "Signum optimizer, ITDA
    fixes"), itself the GDM mech-interp team's batched gradient pursuit (their "Progress update
    1" post); each step, with ``w`` the coefficients over all atoms (0 at first)::

        r = x - w @ atoms                  # residual
        c = atoms @ r                      # correlations
        S = (w != 0); S[argmax(c)] = True  # the support and the largest *positive* correlation
        g = S * c                          # the gradient of |r|^2 / 2 restricted to S (negated)
        u = g @ atoms
        w = relu(w + (u . r) / (u . u) * g)  # exact line search along g, then clamp at 0

    Faithful to that code: the pick is ``argmax`` of the signed correlations (the first on ties)
    over *every* atom, so it may be an atom already in the support (the step then only refits the
    support) or, when no correlation is positive, one whose coefficient the clamp keeps at 0; the
    support is the atoms whose coefficient is non-zero, so a coefficient clamped to 0 leaves it
    (and its atom may be picked again later). Two deliberate differences from sparsify: the step
    is the exact ``(u . r) / (u . u)`` (sparsify floors ``u . u`` at 1e-3, which damps the steps of
    small residuals and makes codes depend on the input's scale), and a step with ``u = 0`` (then
    ``g = 0``: nothing to do) is 0 rather than 0/0. dictionary_learning's
    ``dictionary_learning/grad_pursuit.py`` computes the same steps except that its support is
    sticky (an atom clamped to 0 stays in it); it divides by ``u . u`` without a guard.

    At most ``k`` atoms are ever non-zero. Slots hold the distinct atoms picked in the order of
    their first pick; slots whose coefficient is 0 (never reached, or clamped) have index 0, so
    ``decode(code, atoms)`` is the pursuit's reconstruction ``w @ atoms``. ``atoms`` must have
    unit-norm rows; the correlations are recomputed from the residual each step (``k`` matmuls
    per chunk of tokens), on any device.
    """
    _check_inputs(x, atoms, k, None)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return pursue_gp(x, atoms, k, chunk_size=chunk_size, budget=budget, stats=stats)[0]


def pursue_gp(
    x: Float[Tensor, "*batch d"],
    atoms: Float[Tensor, "n d"],
    k: int,
    *,
    chunk_size: int | None = None,
    trace: bool = False,
    budget: int | float | str | None = None,
    stats: PursuitStats | None = None,
) -> tuple[SparseCode, GPTrace | None]:
    """:func:`gradient_pursuit` without input validation; ``trace=True`` also returns its
    :class:`GPTrace` (what :func:`gp_values` replays)."""
    dt = compute_dtype(x.dtype, atoms.dtype)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    a = atoms.to(dt)
    T = flat.shape[0]
    stats = stats if stats is not None else PursuitStats()
    total = memory_budget(x.device, budget)
    size = chunk_size or chunk_tokens("gp", k, a.shape[0], a.element_size(), x.device, total)
    stats.chunk, stats.full_gram = size, False
    idx = torch.empty(T, k, dtype=torch.long, device=x.device)
    val = torch.empty(T, k, dtype=x.dtype, device=x.device)
    tr = None
    if trace:
        tr = GPTrace(
            torch.empty(T, k, dtype=torch.long, device=x.device),
            torch.empty(T, k, dtype=torch.long, device=x.device),
            torch.empty(T, k, k, dtype=torch.bool, device=x.device),
        )
    with torch.no_grad():
        for start in range(0, T, size):
            sl = slice(start, start + size)
            part = None if tr is None else GPTrace(tr.atoms[sl], tr.picks[sl], tr.alive[sl])
            i, v = _gp_chunk(flat[sl].to(dt), a, k, part)
            idx[sl], val[sl] = i, v.to(x.dtype)
    stats.tokens += T
    stats.steps += T * k
    code = SparseCode(idx.reshape(*lead, k), val.reshape(*lead, k))
    if tr is not None:
        tr = GPTrace(
            tr.atoms.reshape(*lead, k), tr.picks.reshape(*lead, k), tr.alive.reshape(*lead, k, k)
        )
    return code, tr


def _gp_chunk(x: Tensor, atoms: Tensor, k: int, trace: GPTrace | None) -> tuple[Tensor, Tensor]:
    """Non-negative gradient pursuit on one chunk [T, d]: the steps of :func:`gradient_pursuit`
    over ``k`` slots per token (the distinct atoms picked, in order of first pick) instead of a
    dense [T, n] coefficient matrix. Fills ``trace`` when given."""
    T = x.shape[0]
    dev = x.device
    rows = torch.arange(T, device=dev)
    slots = torch.arange(k, device=dev)
    slot_atoms = torch.zeros(T, k, dtype=torch.long, device=dev)  # unused slots: atom 0, w 0
    used = torch.zeros(T, dtype=torch.long, device=dev)  # slots taken so far (<= steps so far)
    w = x.new_zeros(T, k)
    r = x.clone()
    for t in range(k):
        corr = r @ atoms.T
        j = corr.argmax(dim=1)  # the largest signed correlation, first on ties
        match = (slot_atoms == j.unsqueeze(1)) & (slots < used.unsqueeze(1))
        seen = match.any(dim=1)
        pos = torch.where(seen, match.int().argmax(dim=1), used)  # used <= t < k
        slot_atoms[rows, pos] = j
        used += (~seen).long()
        support = w != 0
        support[rows, pos] = True
        g = torch.where(support, corr.gather(1, slot_atoms), 0.0)
        u = decode(SparseCode(slot_atoms, g), atoms)
        num, den = (u * r).sum(dim=1), (u * u).sum(dim=1)
        ok = den > 0
        step = torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)
        w = (w + step.unsqueeze(1) * g).clamp_min(0.0)
        r = x - decode(SparseCode(slot_atoms, w), atoms)
        if trace is not None:
            trace.picks[:, t] = pos
            trace.alive[:, t] = w != 0
    if trace is not None:
        trace.atoms.copy_(slot_atoms)
    return torch.where(w != 0, slot_atoms, 0), w


def gp_values(
    x: Float[Tensor, "*batch d"], atoms: Float[Tensor, "n d"], trace: GPTrace
) -> Float[Tensor, "*batch k"]:
    """Gradient pursuit's coefficients (per slot, as :func:`gradient_pursuit` returns them) as a
    differentiable function of ``x``, for the path in ``trace``.

    Replays the ``k`` steps over the slots' atoms only (their Gram matrix and correlations with
    ``x``): each step's support and clamp pattern are the recorded ones, so for a fixed path the
    coefficients are a smooth (rational) function of ``x`` and gradients flow through ``encode``.
    Computed in :func:`compute_dtype` of the inputs.
    """
    dt = compute_dtype(x.dtype, atoms.dtype)
    sel = atoms.to(dt)[trace.atoms]  # [*batch, k, d]
    b = (sel @ x.to(dt).unsqueeze(-1)).squeeze(-1)  # correlations of the slots' atoms with x
    gram = sel @ sel.transpose(-1, -2)
    k = trace.atoms.shape[-1]
    picked = F.one_hot(trace.picks, k).bool()  # [*batch, step, slot]
    w = torch.zeros_like(b)
    alive = torch.zeros_like(picked[..., 0, :])
    for t in range(k):
        support = alive | picked[..., t, :]
        corr = b - (gram @ w.unsqueeze(-1)).squeeze(-1)  # correlations with the residual
        g = torch.where(support, corr, 0.0)
        num = (g * corr).sum(-1)  # u . r
        den = (g * (gram @ g.unsqueeze(-1)).squeeze(-1)).sum(-1)  # u . u
        ok = den > 0
        step = torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)
        alive = trace.alive[..., t, :]
        w = torch.where(alive, w + step.unsqueeze(-1) * g, 0.0)
    return w


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
