"""A growing dictionary: unit atoms in a capacity buffer, their provenance, and their Gram matrix.

Atoms are appended in blocks (one per builder batch) without re-concatenating or re-normalising
the existing ones. While it fits the memory budget the Gram matrix ``atoms @ atoms.T`` is grown
incrementally: each block adds the rows ``new @ atoms.T`` and their mirror. The block sizes are
recorded so that a dictionary restored from a checkpoint rebuilds a bit-identical Gram matrix by
replaying the same matmuls (same shapes, same kernels), which keeps resumed builds deterministic.
On CPU, small blocks (the exact rule adds one atom at a time) get their rows from the numba kernel
that the exact rule's CPU path also uses, so both paths and a restore agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.pursuit import _kernels, gram_max_atoms

#: Blocks of at most this many atoms get their Gram rows from the numba kernel on CPU.
KERNEL_GRAM_BLOCK = 64


class AtomStore:
    """Unit-norm atoms [n, d] with labels [n, 2], token ids [n] and an optional Gram [n, n]."""

    def __init__(
        self,
        d_in: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 1024,
        gram_max_bytes: int | None = None,
    ):
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.d_in, self.device, self.dtype = d_in, torch.device(device), dtype
        self.n = 0
        self.blocks: list[int] = []
        self._max_gram_atoms = gram_max_atoms(dtype, gram_max_bytes)
        self._atoms = torch.empty(capacity, d_in, device=self.device, dtype=dtype)
        self._labels = torch.empty(capacity, 2, dtype=torch.long, device=self.device)
        self._token_ids = torch.empty(capacity, dtype=torch.long, device=self.device)
        self._gram: Tensor | None = self._new_gram(capacity)

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

    @property
    def gram(self) -> Float[Tensor, "n n"] | None:
        """``atoms @ atoms.T`` (a view), or None once the dictionary outgrew the Gram budget."""
        return None if self._gram is None else self._gram[: self.n, : self.n]

    def gram_row(self, i: int) -> Float[Tensor, " n"]:
        """``atoms @ atoms[i]``: from the Gram matrix while there is one, else computed."""
        if self._gram is not None:
            return self._gram[i, : self.n]
        return self.atoms @ self._atoms[i]

    @property
    def max_gram_atoms(self) -> int:
        """Most atoms the Gram budget holds (past it the store keeps no Gram matrix)."""
        return self._max_gram_atoms

    @property
    def kernel_ok(self) -> bool:
        """Whether numba kernels can work on the buffers in place (CPU, float32/float64)."""
        return (
            _kernels is not None
            and self.device.type == "cpu"
            and self.dtype in (torch.float32, torch.float64)
        )

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` atoms (the Gram matrix is dropped past its budget)."""
        self._reserve(needed)

    def buffers(self) -> tuple[Tensor, Tensor | None]:
        """The whole atom and Gram buffers (capacity rows), for a kernel that appends in place
        and then calls :meth:`commit`."""
        return self._atoms, self._gram

    def commit(self, labels: Int[Tensor, "b 2"], token_ids: Int[Tensor, " b"]) -> None:
        """Register ``b`` atoms a kernel wrote in place after the last one (unit rows, Gram rows
        by :func:`itda_lens._kernels.extend_gram`'s rule), one block each."""
        b = labels.shape[0]
        start, end = self.n, self.n + b
        if end > self._atoms.shape[0] or (self._gram is not None and end > self._gram.shape[0]):
            raise ValueError(f"commit of {b} atoms past the reserved capacity; reserve first")
        self._labels[start:end] = labels.to(self.device, torch.long)
        self._token_ids[start:end] = token_ids.to(self.device, torch.long)
        self.n = end
        self.blocks.extend([1] * b)

    def _new_gram(self, capacity: int) -> Tensor | None:
        size = min(capacity, self._max_gram_atoms)
        return torch.empty(size, size, device=self.device, dtype=self.dtype) if size else None

    def _reserve(self, needed: int) -> None:
        cap = self._atoms.shape[0]
        if needed > cap:
            new_cap = max(needed, 2 * cap)
            for name in ("_atoms", "_labels", "_token_ids"):
                old = getattr(self, name)
                new = old.new_empty(new_cap, *old.shape[1:])
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        if self._gram is not None and needed > self._gram.shape[0]:
            if needed > self._max_gram_atoms:
                self._gram = None  # too large: pursuit falls back to residual updates
            else:
                new = self._new_gram(max(needed, self._atoms.shape[0]))
                assert new is not None
                new[: self.n, : self.n] = self._gram[: self.n, : self.n]
                self._gram = new

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
        self._reserve(self.n + b)
        start, end = self.n, self.n + b
        self._atoms[start:end] = F.normalize(vectors.to(self.device, self.dtype), dim=1)
        self._labels[start:end] = labels.to(self.device, torch.long)
        self._token_ids[start:end] = token_ids.to(self.device, torch.long)
        self.n = end
        self.blocks.append(b)
        self._extend_gram(start, end)

    def truncate(self, n: int, n_blocks: int) -> None:
        """Drop every atom after the first ``n`` (the first ``n_blocks`` blocks)."""
        if sum(self.blocks[:n_blocks]) != n or n > self.n:
            raise ValueError(f"cannot truncate to {n} atoms in {n_blocks} blocks")
        self.n = n
        del self.blocks[n_blocks:]

    def _extend_gram(self, start: int, end: int) -> None:
        if self._gram is None:
            return
        if self.kernel_ok and end - start <= KERNEL_GRAM_BLOCK:
            _kernels.extend_gram(self._atoms.numpy(), self._gram.numpy(), start, end)
            return
        rows = self._atoms[start:end] @ self._atoms[:end].T
        self._gram[start:end, :end] = rows
        self._gram[:start, start:end] = rows[:, :start].T

    @classmethod
    def restore(
        cls,
        atoms: Float[Tensor, "n d"],
        labels: Int[Tensor, "n 2"],
        token_ids: Int[Tensor, " n"],
        blocks: list[int],
        **kwargs: object,
    ) -> AtomStore:
        """Rebuild a store from saved unit atoms, replaying its blocks for an identical Gram."""
        if sum(blocks) != atoms.shape[0]:
            raise ValueError(f"blocks sum to {sum(blocks)} but there are {atoms.shape[0]} atoms")
        store = cls(atoms.shape[1], capacity=max(1, atoms.shape[0]), **kwargs)  # type: ignore[arg-type]
        store._reserve(atoms.shape[0])
        start = 0
        for b in blocks:
            end = start + b
            store._atoms[start:end] = atoms[start:end].to(store.device, store.dtype)
            store._labels[start:end] = labels[start:end].to(store.device)
            store._token_ids[start:end] = token_ids[start:end].to(store.device)
            store.n = end
            store.blocks.append(b)
            store._extend_gram(start, end)
            start = end
        return store
