"""Data-parallel builds on ``torch.distributed``, exact.

Every rank reads its shard of each global batch (a contiguous slice of its sequences) through its
own model replica and scores its tokens against the replicated dictionary as it stood at the batch
start. The tokens that pass the rule there (the candidates: activations, labels, token ids,
stream positions) are all-gathered, and every rank applies the same exact sequential resolution
to them in global stream order, so all ranks end the batch with the same dictionary. A token the
start-of-batch dictionary reconstructs well can still become an atom if an atom added earlier in
the batch enters its pursuit path; each rank tests its own such tokens against the atoms just
added (the same entering test as the single-process rule), and if any rank finds one, the batch
is resolved again with those tokens included. So the result is the single-process dictionary of
the same stream, atom for atom, for any world size. Only rank 0 writes checkpoints and outputs;
a checkpoint can be resumed with another world size.

Works with ``torchrun`` (``torchrun --nproc-per-node N -m itda_lens build ...``) and inside a
user's own script: ``build_itda`` shards whenever a process group of more than one rank exists.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from itda_lens.builder.rule import ActivationBatch, ITDABuilder


class RankMismatchError(ValueError):
    """Ranks of one build disagree on something that must be the same everywhere."""


@dataclass(frozen=True)
class Comm:
    """The process group of a data-parallel build (objects are exchanged pickled, on the CPU)."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> Comm | None:
        """The default process group if one with more than one rank is initialised, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (on every rank)."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, what: str, value: Any) -> None:
        """Raise on every rank if ranks disagree on ``value``."""
        values = self.gather(value)
        bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            raise RankMismatchError(
                f"rank(s) {bad} disagree with rank 0 on {what}: {values[bad[0]]!r} vs {values[0]!r}"
            )


def shard(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` reads: contiguous, sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def wire_bytes(obj: Any) -> int:
    """Bytes ``obj`` takes pickled (what an object all-gather sends per rank)."""
    return len(pickle.dumps(obj))


def distributed_read(
    b: ITDABuilder, batch: ActivationBatch, comm: Comm, offset: int, total: int
) -> tuple[int, int]:
    """Read one global batch of ``total`` rows of which this rank holds rows
    ``[offset, offset + len(batch))``; every rank ends with the same dictionary. Returns (atoms
    added, bytes this rank sent)."""
    b.check(batch.acts)
    if b.stopped:
        return 0, 0
    start = b.tokens_seen
    n = batch.acts.shape[0]
    pos = torch.arange(start + offset, start + offset + n)
    x = batch.acts.to(b.store.device, b.store.dtype)
    rows = (batch.eligible.to(x.device) & (x.norm(dim=1) > 0)).cpu().nonzero().flatten()
    paths = b.score(x[rows])  # against the dictionary at the batch start
    included = paths.accept.clone()
    tol = x[rows].norm(dim=1) * b.tolerance_factor
    snap = b.snapshot()
    sent, gathered, new = 0, [], included.clone()
    while True:
        # only rows not sent before; activations in their own dtype (converted like any batch)
        mine = rows[new]
        payload = (batch.acts[mine].cpu(), batch.labels[mine].cpu(), batch.token_ids[mine].cpu())
        payload += (pos[mine],)
        sent += wire_bytes(payload)
        gathered += comm.gather(payload)
        b.rollback(snap)
        where = torch.cat([p[3] for p in gathered])
        order = torch.argsort(where)  # global stream order
        xs, labels, tids = (torch.cat([p[i] for p in gathered])[order] for i in range(3))
        merged = ActivationBatch(xs, labels, tids, torch.ones(xs.shape[0], dtype=torch.bool))
        b.read(merged, where[order], start + total)
        # tokens left out that an atom added before them would pursue differently
        suspects = torch.zeros(rows.shape[0], dtype=torch.bool)
        for atom, at in zip(
            range(snap.n_atoms, len(b.store)), b.added_at[snap.n_added :], strict=True
        ):
            test = (~included & ~suspects & (pos[rows] > at)).nonzero().flatten()
            if test.numel():
                hit = b.enters(x[rows[test]], paths, test, tol[test], atom=atom)
                suspects[test[hit]] = True
        if not any(comm.gather(bool(suspects.any()))):
            return len(b.store) - snap.n_atoms, sent
        included |= suspects
        new = suspects


def dictionary_digest(b: ITDABuilder) -> str:
    """A hash of the atoms, labels and token ids (to check that ranks agree)."""
    h = hashlib.sha256()
    for t in (b.store.atoms, b.store.labels, b.store.token_ids):
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def empty_like(b: ITDABuilder, device: Any) -> ActivationBatch:
    """A batch with no rows (a rank whose shard of a short last batch is empty)."""
    return ActivationBatch(
        torch.empty(0, b.d_in, device=device),
        torch.empty(0, 2, dtype=torch.long),
        torch.empty(0, dtype=torch.long),
        torch.empty(0, dtype=torch.bool),
    )


__all__ = [
    "Comm",
    "RankMismatchError",
    "dictionary_digest",
    "distributed_read",
    "empty_like",
    "shard",
    "wire_bytes",
]
