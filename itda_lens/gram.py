"""Gram rows of a dictionary, quantized: the candidate filter that makes pursuit fast at any size.

Matching pursuit in correlation space updates ``c -= v * G[j]`` after each pick ``j``. Here the rows
``G[j] = atoms @ atoms[j]`` are stored as int16 (``round(32767 * g)``, absolute error at most
``0.5 / 32767`` for unit atoms, half the bytes of float32), either for every atom (**full**) or for
the atoms picked most often in a bounded cache (**cached**; rows are computed on demand in one GEMM
for the atoms a chunk picks and evicted least-used first). The rows never decide a pick: pursuit
keeps each token's residual explicitly and checks every atom whose approximate correlation lies
within the rows' error bound of the best one with an exact dot product, so supports and
coefficients are those of the literal algorithm whatever the rows hold (see :mod:`itda_lens.pursuit`).

How many rows fit, and whether the full matrix does, is planned from one memory budget
(:mod:`itda_lens.budget`). Only torch here; the CPU kernels read the buffers as numpy arrays.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["QSCALE", "GramRows", "quantize_"]

#: int16 rows hold ``round(QSCALE * g)`` for ``g`` in [-1, 1].
QSCALE = 32767
#: Rows computed per GEMM when filling (bounds the float temporary).
FILL_BLOCK_BYTES = 64 * 2**20


def quantize_(g: Tensor) -> Tensor:
    """Gram entries of unit atoms -> int16 (clamped to [-1, 1]; error <= 0.5 / QSCALE + the clamp).
    ``g`` is overwritten (callers pass a temporary)."""
    return g.clamp_(-1.0, 1.0).mul_(QSCALE).round_().to(torch.int16)


class GramRows:
    """Int16 Gram rows of ``n`` atoms in ``capacity_rows`` slots, columns for up to ``capacity_cols``.

    ``slot[i]`` is atom i's row slot (-1: not held), ``owner[s]`` the atom in slot s (-1: free),
    ``uses[i]`` how often atom i was picked (least-used rows are evicted first). ``full`` when every
    atom has its row (then ``slot[i] == i``). ``error`` bounds |dequantized - exact| of any entry.
    """

    def __init__(
        self,
        capacity_rows: int,
        capacity_cols: int,
        *,
        d: int,
        source_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if capacity_rows < 1 or capacity_cols < 1:
            raise ValueError(
                f"GramRows needs room for at least one row and column, got "
                f"{capacity_rows} x {capacity_cols}"
            )
        self.device = torch.device(device)
        self.d = d
        self.source_dtype = source_dtype
        self.n = 0
        # entries are written before they are read (rows when filled, columns as atoms arrive)
        self.q = torch.empty(capacity_rows, capacity_cols, dtype=torch.int16, device=self.device)
        self.slot = torch.full((capacity_cols,), -1, dtype=torch.long, device=self.device)
        self.owner = torch.full((capacity_rows,), -1, dtype=torch.long, device=self.device)
        self.uses = torch.zeros(capacity_cols, dtype=torch.long, device=self.device)
        self.computed = 0  # rows computed on demand (cache misses), for benchmarks

    @classmethod
    def from_gram(cls, gram: Float[Tensor, "n n"], d: int) -> GramRows:
        """Wrap a float Gram matrix the caller already has (rows used as they are, scale 1)."""
        n = gram.shape[0]
        out = cls(1, 1, d=d, source_dtype=gram.dtype, device=gram.device)
        out.q = gram.contiguous()
        out.slot = torch.arange(n, device=gram.device)
        out.owner = out.slot.clone()
        out.uses = torch.zeros(n, dtype=torch.long, device=gram.device)
        out.n = n
        return out

    # --- planning ---------------------------------------------------------------------------

    @staticmethod
    def row_bytes(n_cols: int) -> int:
        return 2 * n_cols

    @classmethod
    def plan_rows(cls, n_cols: int, budget: int) -> int:
        """Row slots of ``n_cols`` columns that fit ``budget`` bytes (at least one)."""
        return max(1, budget // cls.row_bytes(max(1, n_cols)))

    @classmethod
    def max_full_atoms(cls, budget: int) -> int:
        """Most atoms whose full int16 Gram fits ``budget`` bytes."""
        return math.isqrt(max(0, budget) // 2)

    @classmethod
    def for_atoms(cls, atoms: Float[Tensor, "n d"], budget: int, *, fill: bool = True) -> GramRows:
        """Rows for a fixed dictionary: full when its Gram fits ``budget``, else a cache of as many
        rows as fit (filled on demand). ``fill=False`` leaves a full plan's rows to be filled later."""
        n = atoms.shape[0]
        rows = min(n, cls.plan_rows(n, budget))
        out = cls(rows, n, d=atoms.shape[1], source_dtype=atoms.dtype, device=atoms.device)
        out.n = n
        if rows == n:
            out.slot[:] = torch.arange(n, device=out.device)
            out.owner[:] = out.slot
            if fill:
                out.fill_all(atoms)
        return out

    # --- state ------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Every atom has its row."""
        return self.n == 0 or bool(self.slot[: self.n].min() >= 0)

    @property
    def capacity_rows(self) -> int:
        return self.q.shape[0]

    @property
    def capacity_cols(self) -> int:
        return self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.numel() * 2 + (self.slot.numel() * 2 + self.owner.numel()) * 8

    @property
    def quantized(self) -> bool:
        return self.q.dtype == torch.int16

    @property
    def error(self) -> float:
        """Bound on |dequantized entry - exact Gram entry|: rounding to int16 (if quantized) plus
        the rounding of the GEMM that computed the entry (``(d + 2) eps`` for unit atoms)."""
        dt = self.source_dtype if self.quantized else self.q.dtype
        return (0.5 / QSCALE if self.quantized else 0.0) + (self.d + 2) * torch.finfo(dt).eps

    @property
    def scale(self) -> float:
        return 1.0 / QSCALE if self.quantized else 1.0

    def count(self, picks: Tensor) -> None:
        """Record picks (atom ids) so that eviction keeps the most used rows."""
        if picks.numel():
            self.uses[: self.n] += torch.bincount(
                picks.reshape(-1).to(self.device), minlength=self.n
            )[: self.n]

    # --- reading ----------------------------------------------------------------------------

    def missing(self, ids: Int[Tensor, " m"]) -> Int[Tensor, " u"]:
        """The distinct atoms among ``ids`` whose rows are not held."""
        ids = ids.reshape(-1).to(self.device)
        return torch.unique(ids[self.slot[ids] < 0])

    def ensure(self, ids: Int[Tensor, " m"], atoms: Float[Tensor, "n d"]) -> Int[Tensor, " u"]:
        """Compute the rows of the atoms among ``ids`` not held (one GEMM), evicting the least-used
        rows of atoms not in ``ids``. Returns the atoms whose rows were added; when more are
        missing than the cache holds, only the first ones (callers come back for the rest)."""
        need = self.missing(ids)
        if need.numel() == 0:
            return need
        free = (self.owner < 0).nonzero().flatten()
        if free.numel() < need.numel():
            keep = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            keep[ids.reshape(-1).to(self.device)] = True
            taken = (self.owner >= 0).nonzero().flatten()
            victims = taken[~keep[self.owner[taken]]]
            extra = min(need.numel() - free.numel(), victims.numel())
            if extra:
                order = torch.argsort(self.uses[self.owner[victims]], stable=True)[:extra]
                victims = victims[order]
                self.slot[self.owner[victims]] = -1
                self.owner[victims] = -1
                free = torch.cat([free, victims])
        need = need[: free.numel()]
        slots = free[: need.numel()]
        self.slot[need] = slots
        self.owner[slots] = need
        self.fill(need, atoms)
        self.computed += need.numel()
        return need

    def dequantized(self, ids: Int[Tensor, " m"], dtype: torch.dtype) -> Float[Tensor, "m n"]:
        """Rows of atoms ``ids`` (all held) as floats in ``dtype``."""
        rows = self.q[self.slot[ids], : self.n].to(dtype)
        return rows * self.scale if self.quantized else rows

    def rows_of(
        self, ids: Int[Tensor, " m"], atoms: Float[Tensor, "n d"], dtype: torch.dtype
    ) -> Float[Tensor, "m n"]:
        """Rows of atoms ``ids`` as floats, computing the missing ones first (in groups of at
        most the cache's size when it cannot hold them all at once)."""
        if self.missing(ids).numel() == 0:
            return self.dequantized(ids, dtype)
        uniq = torch.unique(ids)
        if uniq.numel() <= self.capacity_rows:
            self.ensure(uniq, atoms)
            return self.dequantized(ids, dtype)
        out = torch.empty(ids.numel(), self.n, dtype=dtype, device=self.device)
        for lo in range(0, uniq.numel(), self.capacity_rows):
            group = uniq[lo : lo + self.capacity_rows]
            self.ensure(group, atoms)
            hit = torch.isin(ids, group)
            out[hit] = self.dequantized(ids[hit], dtype)
        return out

    # --- writing ----------------------------------------------------------------------------

    def fill(self, ids: Tensor, atoms: Tensor) -> None:
        """Rows of ``ids`` (already given slots) from one GEMM per block against all atoms."""
        n = self.n
        block = max(1, FILL_BLOCK_BYTES // max(1, n * atoms.element_size()))
        for lo in range(0, ids.numel(), block):
            part = ids[lo : lo + block]
            slots = self.slot[part]
            q = quantize_(atoms[part] @ atoms[:n].T)
            first = int(slots[0])
            if bool((slots == torch.arange(first, first + len(slots), device=self.device)).all()):
                self.q[first : first + len(slots), :n] = q  # a run of slots: a plain copy
            else:
                self.q[slots, :n] = q

    def fill_all(self, atoms: Float[Tensor, "n d"]) -> None:
        """Every row of a full plan (``slot[i] == i``), from the upper triangle of the Gram matrix
        (half the GEMM work), each block mirrored into its columns."""
        n = self.n
        block = max(1, FILL_BLOCK_BYTES // max(1, n * atoms.element_size()))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            q = quantize_(atoms[lo:hi] @ atoms[lo:n].T)
            self.q[lo:hi, lo:n] = q
            self.q[hi:n, lo:hi] = q[:, hi - lo :].T

    def reserve(self, cols: int, rows: int | None = None) -> None:
        """Room for ``cols`` atoms and ``rows`` row slots (default: unchanged)."""
        rows = self.capacity_rows if rows is None else rows
        if cols <= self.capacity_cols and rows == self.capacity_rows:
            return
        cols = max(cols, self.capacity_cols)
        owner = torch.full((rows,), -1, dtype=torch.long, device=self.device)
        if rows >= self.capacity_rows:
            q = torch.empty(rows, cols, dtype=torch.int16, device=self.device)
            q[: self.capacity_rows, : self.n] = self.q[:, : self.n]
            owner[: self.capacity_rows] = self.owner
        else:
            # a full plan becoming a cache (the atoms outgrew the budget): both would not fit the
            # budget at once, so the old rows are released first and the cache starts empty
            # (rows are recomputed exactly when a pick needs them; use counts are kept)
            self.q = self.q.new_empty(0, 0)
            self.slot[:] = -1
            q = torch.empty(rows, cols, dtype=torch.int16, device=self.device)
        slot = torch.full((cols,), -1, dtype=torch.long, device=self.device)
        slot[: self.slot.numel()] = self.slot
        uses = torch.zeros(cols, dtype=torch.long, device=self.device)
        uses[: self.uses.numel()] = self.uses
        self.q, self.owner, self.slot, self.uses = q, owner, slot, uses

    def append(self, rows: Float[Tensor, "b m"]) -> None:
        """Add ``b`` atoms whose exact Gram rows against all atoms including themselves
        (``m = n + b`` columns) are given: their columns go into every held row, and each gets a
        row slot while a free one exists (a full plan reserves one per atom)."""
        b, m = rows.shape
        start = self.n
        if m != start + b:
            raise ValueError(f"append needs rows over {start + b} atoms, got {m} columns")
        if m > self.capacity_cols:
            raise ValueError(f"append past the column capacity {self.capacity_cols}; reserve first")
        q = quantize_(rows)
        held = (self.owner >= 0).nonzero().flatten()
        if held.numel():
            self.q[held, start:m] = q[:, self.owner[held]].T
        self.n = m
        free = (self.owner < 0).nonzero().flatten()[:b]
        if free.numel():
            new = torch.arange(start, start + free.numel(), device=self.device)
            self.slot[new], self.owner[free] = free, new
            self.q[free, :m] = q[: free.numel()]

    def truncate(self, n: int) -> None:
        """Forget every atom from ``n`` on (their rows and columns)."""
        if n >= self.n:
            return
        gone = (self.owner >= n).nonzero().flatten()
        self.owner[gone] = -1
        self.slot[n:] = -1
        self.uses[n:] = 0
        self.n = n
