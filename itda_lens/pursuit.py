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
buffers exist at a time. With a precomputed Gram matrix ``G = atoms @ atoms.T`` MP runs in
correlation space: one matmul per token, then ``k`` row updates ``c -= v * G[j]`` (n·d + k·n work
per token instead of the reference's k·n·d). This module knows only torch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "GRAM_MAX_BYTES",
    "UNIT_NORM_TOL",
    "GramRows",
    "SparseCode",
    "check_atoms",
    "compute_dtype",
    "decode",
    "matching_pursuit",
    "mp_values",
    "omp_values",
    "orthogonal_matching_pursuit",
    "reference_matching_pursuit",
]

#: Working-memory budget for one chunk of tokens (bytes): small enough that a chunk's [T, n]
#: buffers stay in cache across the k steps, which is what makes the Gram path fast on CPUs.
CHUNK_BYTES = 8 * 2**20
#: Fewest tokens per chunk, so that per-step dispatch overhead stays small for huge dictionaries.
MIN_CHUNK = 16
#: Largest Gram matrix built automatically (bytes); 1 GiB is 16,384 fp32 atoms.
GRAM_MAX_BYTES = 2**30
#: Allowed |norm - 1| of an atom: loose enough for half-precision rounding, tight enough to catch
#: dictionaries that were never normalised.
UNIT_NORM_TOL = 1e-2


class GramRows:
    """Rows of ``atoms @ atoms.T`` computed on demand and cached (FIFO) within a byte budget.

    For dictionaries whose full Gram matrix does not fit: each pursuit step needs the rows of the
    atoms it just picked; rows for atoms picked again (by other tokens, later steps or later chunks)
    come from the cache instead of another ``n x d`` product. Never holds an ``n x n`` matrix.
    """

    def __init__(self, atoms: Float[Tensor, "n d"], max_bytes: int = GRAM_MAX_BYTES):
        self.atoms = atoms
        n = atoms.shape[0]
        self.capacity = int(max_bytes // (n * atoms.element_size()))
        self.rows = atoms.new_empty(0, n)
        self.slot = torch.full((n,), -1, dtype=torch.long, device=atoms.device)
        self.owner = torch.empty(0, dtype=torch.long, device=atoms.device)
        self.next = 0
        self.computed = 0  # rows computed so far (a cache-efficiency statistic)

    def _grow(self, needed: int) -> None:
        size = min(self.capacity, max(needed, 2 * self.rows.shape[0], 256))
        if size > self.rows.shape[0]:
            rows = self.atoms.new_empty(size, self.atoms.shape[0])
            rows[: self.rows.shape[0]] = self.rows
            owner = torch.full((size,), -1, dtype=torch.long, device=self.atoms.device)
            owner[: self.owner.shape[0]] = self.owner
            self.rows, self.owner = rows, owner

    def __call__(self, j: Int[Tensor, " t"]) -> Float[Tensor, "t n"]:
        uniq = torch.unique(j)
        if uniq.numel() > self.capacity:  # cannot cache them all at once: compute directly
            self.computed += uniq.numel()
            return (self.atoms[uniq] @ self.atoms.T)[torch.searchsorted(uniq, j)]
        missing = uniq[self.slot[uniq] < 0]
        if missing.numel():
            self._grow(self.owner.shape[0] + missing.numel())
            size = self.owner.shape[0]
            order = (self.next + torch.arange(size, device=j.device)) % size
            owners = self.owner[order]
            needed = torch.zeros_like(self.slot, dtype=torch.bool)
            needed[uniq] = True
            free = order[(owners < 0) | ~needed[owners.clamp_min(0)]][: missing.numel()]
            evicted = self.owner[free]
            self.slot[evicted[evicted >= 0]] = -1
            self.rows[free] = self.atoms[missing] @ self.atoms.T
            self.owner[free] = missing
            self.slot[missing] = free
            self.next = int(free[-1] + 1) % size
            self.computed += missing.numel()
        return self.rows.index_select(0, self.slot[j])


GramArg = Tensor | GramRows | None | Literal["auto"]


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


def check_atoms(atoms: Tensor) -> None:
    """Raise if ``atoms`` is not a non-empty, finite [n, d] float matrix with unit-norm rows."""
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
    dev = (atoms.float().norm(dim=1) - 1).abs().max().item()
    if dev > UNIT_NORM_TOL:
        raise ValueError(
            f"atoms must have unit L2 norm (max |norm - 1| = {dev:.3g}); "
            "normalise them first, e.g. torch.nn.functional.normalize(atoms, dim=1)"
        )


def _check_inputs(x: Tensor, atoms: Tensor, k: int, gram: GramArg) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
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
    if isinstance(gram, GramRows) and gram.atoms.shape != atoms.shape:
        raise ValueError("gram rows were built for a different dictionary")
    if gram is not None and not isinstance(gram, Tensor | GramRows) and gram != "auto":
        raise ValueError(f"gram must be a tensor, GramRows, None or 'auto', got {gram!r}")


def _resolve_gram(
    gram: GramArg, atoms: Tensor, n_tokens: int, k: int, dtype: torch.dtype
) -> Tensor | GramRows | None:
    """A given Gram (or row provider); for 'auto', a full Gram when it fits and pays for itself,
    else cached Gram rows, which tokens of a chunk and later chunks share."""
    if isinstance(gram, Tensor):
        return gram.to(dtype)
    if gram is None or isinstance(gram, GramRows):
        return gram
    n = atoms.shape[0]
    if n_tokens * k < n:  # n²·d to build a Gram vs. the (k-1)·n·d per token it saves
        return None
    if n * n * torch.finfo(dtype).bits // 8 <= GRAM_MAX_BYTES:
        return atoms @ atoms.T
    return GramRows(atoms)


def gram_rows(gram: Tensor | GramRows, j: Tensor) -> Tensor:
    """Rows ``G[j]`` of a full Gram matrix or a :class:`GramRows` provider."""
    return gram(j) if isinstance(gram, GramRows) else gram.index_select(0, j)


def _chunks(
    n_tokens: int, n_atoms: int, floats_per_atom: int, itemsize: int, chunk_size: int | None
):
    size = chunk_size or max(MIN_CHUNK, CHUNK_BYTES // max(1, n_atoms * floats_per_atom * itemsize))
    for start in range(0, n_tokens, size):
        yield slice(start, min(start + size, n_tokens))


def _mp_chunk(
    x: Tensor, atoms: Tensor, k: int, gram: Tensor | GramRows | None
) -> tuple[Tensor, Tensor]:
    """MP on one chunk [T, d] in compute dtype; Gram path updates correlations, else the residual.

    The [T, n] work buffers are allocated once per chunk and reused by every step.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    val = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    corr = x @ atoms.T
    mag = torch.empty_like(corr)
    if gram is not None:
        picked = torch.empty_like(corr) if isinstance(gram, Tensor) else None
        for t in range(k):
            j = torch.abs(corr, out=mag).argmax(dim=1)
            v = corr[rows, j]
            idx[:, t], val[:, t] = j, v
            g = torch.index_select(gram, 0, j, out=picked) if picked is not None else gram(j)
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


def _omp_chunk(
    x: Tensor, atoms: Tensor, k: int, gram: Tensor | GramRows | None
) -> tuple[Tensor, Tensor]:
    """Batched OMP (Cholesky of the support Gram, grown one row per step) on one chunk [T, d]."""
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
        g = gram_rows(gram, j) if gram is not None else atoms.index_select(0, j) @ atoms.T
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
    dt = compute_dtype(x.dtype, atoms.dtype)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    a = atoms.to(dt)
    g = _resolve_gram(gram, a, flat.shape[0], k, dt)
    idx = torch.empty(flat.shape[0], k, dtype=torch.long, device=x.device)
    val = torch.empty(flat.shape[0], k, dtype=x.dtype, device=x.device)
    # buffers per token, in units of n floats: MP ~3 (corr, |corr|, a gathered row); OMP adds k rows.
    per_atom = 3 if kind == "mp" else k + 4
    kernel = _mp_chunk if kind == "mp" else _omp_chunk
    with torch.no_grad():
        for sl in _chunks(flat.shape[0], a.shape[0], per_atom, a.element_size(), chunk_size):
            i, v = kernel(flat[sl].to(dt), a, k, g)
            idx[sl], val[sl] = i, v.to(x.dtype)
    return SparseCode(idx.reshape(*lead, k), val.reshape(*lead, k))


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
