"""A growing dictionary: unit atoms in a capacity buffer, their provenance, and their Gram rows.

Atoms are appended in blocks (one per builder batch, or one atom at a time by the exact rule's CPU
kernel) without re-concatenating or re-normalising the existing ones. The int16 Gram rows
(:class:`~itda_lens.gram.GramRows`) grow with them: every row while the full matrix fits the
memory budget (:mod:`itda_lens.budget`), past it a cache of the most used rows. The rows only
propose candidates to pursuit (every pick is checked exactly), so what the store holds never
changes a verdict: a restored store recomputes them, and the budget changes speed, not atoms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.budget import memory_budget
from itda_lens.gram import GramRows
from itda_lens.pursuit import kernels


class AtomStore:
    """Unit-norm atoms [n, d] with labels [n, 2], token ids [n] and their Gram rows."""

    def __init__(
        self,
        d_in: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 1024,
        budget: int | float | str | None = None,
        max_atoms: int | None = None,
    ):
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.d_in, self.device, self.dtype = d_in, torch.device(device), dtype
        self.n = 0
        self.blocks: list[int] = []
        self.budget = memory_budget(self.device, budget)
        self.max_atoms = max_atoms  # the store never grows past it (None: no limit)
        self._atoms = torch.empty(capacity, d_in, device=self.device, dtype=dtype)
        self._labels = torch.empty(capacity, 2, dtype=torch.long, device=self.device)
        self._token_ids = torch.empty(capacity, dtype=torch.long, device=self.device)
        self.rows = GramRows(
            *self._row_plan(capacity), d=d_in, source_dtype=dtype, device=self.device
        )

    def __len__(self) -> int:
        return self.n

    @property
    def atoms(self) -> Float[Tensor, "n d"]:
        return self._atoms[: self.n]

    @property
    def labels(self) -> Int[Tensor, "n 2"]:
        return self._labels[: self.n]

    @property
    def token_ids(self) -> Int[Tensor, " n"]:
        return self._token_ids[: self.n]

    def gram_row(self, i: int) -> Float[Tensor, " n"]:
        """``atoms @ atoms[i]``, exactly (one matrix-vector product)."""
        return self.atoms @ self._atoms[i]

    @property
    def max_full_atoms(self) -> int:
        """Most atoms whose full int16 Gram fits the budget (past it the rows are a cache)."""
        return GramRows.max_full_atoms(self.budget)

    @property
    def kernel_ok(self) -> bool:
        """Whether numba kernels can work on the buffers in place (CPU, float32/float64)."""
        return (
            kernels is not None
            and self.device.type == "cpu"
            and self.dtype in (torch.float32, torch.float64)
        )

    def _row_plan(self, cols: int) -> tuple[int, int]:
        """(row slots, columns) for a capacity of ``cols`` atoms: square while it fits. On CPU a
        square plan is allocated once at the largest size it can reach (the budget's or
        ``max_atoms``): pages are only backed by memory when written, so growing never copies the
        matrix (a GPU allocates what it reserves, so there it grows with the atoms)."""
        largest = min(self.max_full_atoms, self.max_atoms or self.max_full_atoms)
        if cols <= largest:
            size = largest if self.device.type == "cpu" else cols
            return size, size
        return min(cols, GramRows.plan_rows(cols, self.budget)), cols

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` atoms (the Gram rows become a cache past the budget); never
        past ``max_atoms``, which the store cannot outgrow (a kernel that reserves a whole
        sub-batch near the cap must not copy the Gram rows into a larger plan)."""
        if self.max_atoms is not None:
            needed = min(needed, self.max_atoms)
        cap = self._atoms.shape[0]
        if needed > cap:
            new_cap = max(needed, 2 * cap)
            if needed <= self.max_full_atoms < new_cap:  # stay full as long as possible
                new_cap = self.max_full_atoms
            if self.max_atoms is not None and needed <= self.max_atoms < new_cap:
                new_cap = self.max_atoms
            for name in ("_atoms", "_labels", "_token_ids"):
                old = getattr(self, name)
                new = old.new_empty(new_cap, *old.shape[1:])
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        cap = self._atoms.shape[0]
        if cap > self.rows.capacity_cols:
            rows, cols = self._row_plan(cap)
            self.rows.reserve(cols, rows)

    def buffers(self) -> tuple[Tensor, GramRows]:
        """The whole atom buffer (capacity rows) and the Gram rows, for a kernel that appends in
        place and then calls :meth:`commit`."""
        return self._atoms, self.rows

    def commit(self, labels: Int[Tensor, "b 2"], token_ids: Int[Tensor, " b"]) -> None:
        """Register ``b`` atoms a kernel wrote in place after the last one (unit rows, their Gram
        entries written as :func:`itda_lens.kernels.exact_mp` does), one block each."""
        b = labels.shape[0]
        start, end = self.n, self.n + b
        if end > self._atoms.shape[0] or end > self.rows.capacity_cols:
            raise ValueError(f"commit of {b} atoms past the reserved capacity; reserve first")
        self._labels[start:end] = labels.to(self.device, torch.long)
        self._token_ids[start:end] = token_ids.to(self.device, torch.long)
        self.n = end
        self.rows.n = end
        self.blocks.extend([1] * b)

    def add(
        self,
        vectors: Float[Tensor, "b d"],
        labels: Int[Tensor, "b 2"],
        token_ids: Int[Tensor, " b"],
    ) -> None:
        """Append vectors (normalised here) with their provenance as one block."""
        b = vectors.shape[0]
        if b == 0:
            return
        if vectors.shape[1] != self.d_in:
            raise ValueError(
                f"d_in mismatch: store holds {self.d_in}-d atoms, got {vectors.shape[1]}-d"
            )
        norms = vectors.norm(dim=1)
        if bool((norms == 0).any()) or not bool(torch.isfinite(vectors).all()):
            raise ValueError("atoms must be finite and non-zero")
        if self.max_atoms is not None and self.n + b > self.max_atoms:
            raise ValueError(
                f"appending {b} atoms to {self.n} would pass max_atoms={self.max_atoms}"
            )
        self.reserve(self.n + b)
        start, end = self.n, self.n + b
        self._atoms[start:end] = F.normalize(vectors.to(self.device, self.dtype), dim=1)
        self._labels[start:end] = labels.to(self.device, torch.long)
        self._token_ids[start:end] = token_ids.to(self.device, torch.long)
        self.n = end
        self.blocks.append(b)
        self.rows.append(self._atoms[start:end] @ self._atoms[:end].T)

    def truncate(self, n: int, n_blocks: int) -> None:
        """Drop every atom after the first ``n`` (the first ``n_blocks`` blocks)."""
        if sum(self.blocks[:n_blocks]) != n or n > self.n:
            raise ValueError(f"cannot truncate to {n} atoms in {n_blocks} blocks")
        self.n = n
        self.rows.truncate(n)
        del self.blocks[n_blocks:]

    @classmethod
    def restore(
        cls,
        atoms: Float[Tensor, "n d"],
        labels: Int[Tensor, "n 2"],
        token_ids: Int[Tensor, " n"],
        blocks: list[int],
        **kwargs: object,
    ) -> AtomStore:
        """Rebuild a store from saved unit atoms (the Gram rows are recomputed; they never change
        a verdict, so the restored store continues exactly as the saved one would have)."""
        if sum(blocks) != atoms.shape[0]:
            raise ValueError(f"blocks sum to {sum(blocks)} but there are {atoms.shape[0]} atoms")
        store = cls(atoms.shape[1], capacity=max(1, atoms.shape[0]), **kwargs)  # type: ignore[arg-type]
        n = atoms.shape[0]
        store._atoms[:n] = atoms.to(store.device, store.dtype)
        store._labels[:n] = labels.to(store.device)
        store._token_ids[:n] = token_ids.to(store.device)
        store.n = n
        store.blocks = list(blocks)
        rows = store.rows
        rows.n = n
        if rows.capacity_rows >= n:
            ids = torch.arange(n, device=store.device)
            rows.slot[:n], rows.owner[:n] = ids, ids
            rows.fill_all(store.atoms)
        return store
