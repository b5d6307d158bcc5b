"""The add rule: which activations of a stream become atoms.

**Exact** (``add_rule="exact"``, the default; the paper's rule): the activation at stream position
t becomes an atom iff ``cos(x_t, x_hat_t) < cos_threshold``, where ``x_hat_t`` is its k-step pursuit
reconstruction over *every atom added before it*. Batches exist only for throughput: the same
stream gives the same atoms, labels and order for any batch size. A sub-batch is scored against
the dictionary at its start in one pass; a verdict can change only if an atom added later in the
sub-batch would enter the token's pursuit path, which is tested exactly from the new atom's Gram row
and the path's coefficients (``|<r_t, a_new>| > |<r_t, a_pick>|`` at some step t); only those
tokens are pursued again, in order. On CPU with MP, a compiled kernel
(:func:`itda_lens.kernels.exact_mp`) instead walks the sub-batch one token at a time from one
matmul against the atoms at its start (no token is pursued twice, no per-atom Python overhead);
both paths give the same atoms. Verdicts are computed in ``decision_dtype`` (float64 by default)
so that rounding, which differs between batch shapes, cannot flip one.

**Batch** (``add_rule="batch"``, the reference code's behaviour): every token of a batch is judged
against the dictionary as it stood at the start of the batch; candidates are then taken in stream
order, skipping any with ``|cos| >= cos_threshold`` to an atom accepted earlier in the same batch
(the reference code adds them all). The dictionary then depends on the batch size.

Ineligible positions (BOS/PAD) and zero vectors are never candidates but count as tokens read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from itda_lens import pursuit
from itda_lens.builder.config import BuildConfig
from itda_lens.dictionary import AtomStore
from itda_lens.pursuit import SparseCode, decode, kernels, pursue
from itda_lens.saes import ITDA, BuildRecord, SearchRecord, StreamRecord

#: Sub-batch sizes of the exact rule (tokens scored in one pass): small while most tokens become
#: atoms (each new atom sends later tokens back to the pursuit), large once few do.
MIN_SUB_BATCH, MAX_SUB_BATCH = 8, 4096
#: Sub-batches of at most this many tokens are resolved on one thread: their matmuls are tiny, and
#: multi-threaded BLAS on tiny products costs more than it saves (60x more on a busy CPU).
SINGLE_THREAD_TOKENS = 256
#: Working-set budget of the CPU kernel's sub-batch correlations [T, n] (bytes), and its bounds.
KERNEL_CORR_BYTES = 32 * 2**20
KERNEL_SUB_BATCH = (64, 4096)
#: How far above the threshold the kernel's early rejection must see ``cos`` (by decision dtype):
#: far above the rounding of its |r|^2 bookkeeping, so no token the full pursuit accepts is rejected.
EARLY_MARGIN = {torch.float64: 1e-6, torch.float32: 1e-3}
#: Candidates the batch rule compares with each other in one block.
DISTINCT_BLOCK = 2048
#: Growth-curve points kept in the metadata (geometric in the atom count, plus the end).
GROWTH_POINTS = 256


class ActivationBatch(NamedTuple):
    """Activations [n, d] with provenance; ``eligible`` marks rows allowed to become atoms;
    ``outputs`` are the same tokens' activations at a transcoder's output hook (else None)."""

    acts: Float[Tensor, "n d"]
    labels: Int[Tensor, "n 2"]
    token_ids: Int[Tensor, " n"]
    eligible: Bool[Tensor, " n"]
    outputs: Float[Tensor, "n d_out"] | None = None

    def head(self, n: int) -> ActivationBatch:
        """The first ``n`` rows."""
        return ActivationBatch(*(None if t is None else t[:n] for t in self))


@dataclass
class Paths:
    """Pursuit paths of a sub-batch: picks, values, the |correlation| at each pick and (OMP) the
    residual's coefficients before each step; ``accept`` is the verdict they give."""

    idx: Tensor
    val: Tensor
    peaks: Tensor
    coefs: Tensor | None
    accept: Tensor

    def put(self, rows: Tensor, other: Paths) -> None:
        for name in ("idx", "val", "peaks", "accept"):
            getattr(self, name)[rows] = getattr(other, name)
        if self.coefs is not None and other.coefs is not None:
            self.coefs[rows] = other.coefs


@dataclass
class ITDABuilder:
    """Greedy dictionary state for one hook point: feed it batches in stream order with :meth:`update`."""

    d_in: int
    cfg: BuildConfig = field(default_factory=BuildConfig)
    device: str | torch.device = "cpu"
    #: "auto": the CPU kernel where it runs (MP on CPU), else the torch path; "torch": always the
    #: torch path (what a GPU runs), e.g. to exercise it on CPU. Both give the same dictionary.
    backend: Literal["auto", "torch"] = "auto"
    #: bytes its Gram rows may use (default: the process's memory budget on its device)
    budget: int | None = None
    store: AtomStore = field(init=False)
    tokens_seen: int = 0
    tokens_scored: int = 0
    n_batches: int = 0
    seconds: float = 0.0
    #: stream position (token index) at which each atom was read
    added_at: list[int] = field(default_factory=list)
    stop_reason: str | None = None
    _sub: int = MIN_SUB_BATCH
    #: torch-path steps run one after another (scorings and resolutions; each is a few kernel
    #: launches on a GPU): what a GPU build costs beyond its arithmetic (diagnostic, not saved)
    steps: int = 0

    def __post_init__(self) -> None:
        self.store = AtomStore(
            self.d_in,
            device=self.device,
            dtype=self.cfg.torch_decision_dtype,
            budget=self.budget,
            max_atoms=self.cfg.max_atoms,
        )

    @property
    def full(self) -> bool:
        return self.cfg.max_atoms is not None and len(self.store) >= self.cfg.max_atoms

    @property
    def stopped(self) -> bool:
        """Full, or converged (``patience_tokens`` read without a new atom): reads nothing more."""
        return self.stop_reason is not None

    def _cutoff(self) -> float:
        """Last stream position this builder may read before it counts as converged."""
        p = self.cfg.patience_tokens
        if p is None:
            return math.inf
        return (self.added_at[-1] if self.added_at else -1) + p

    def check(self, acts: Tensor) -> None:
        """Refuse activations of the wrong shape, NaN or Inf."""
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(
                f"d_in mismatch: expected activations [n, {self.d_in}], got {tuple(acts.shape)}"
            )
        if not bool(torch.isfinite(acts).all()):
            raise ValueError(f"activations contain NaN or Inf (batch {self.n_batches})")

    def update(self, batch: ActivationBatch) -> int:
        """Read one batch (rows in stream order); returns the number of atoms added."""
        self.check(batch.acts)
        if self.full and not self.stopped:  # e.g. handed a store that is already at max_atoms
            self.stop_reason = "full"
        if self.stopped:
            return 0
        n = batch.acts.shape[0]
        pos = torch.arange(self.tokens_seen, self.tokens_seen + n)
        return self.read(batch, pos, self.tokens_seen + n)

    def read(self, batch: ActivationBatch, pos: Tensor, end: int) -> int:
        """Judge ``batch``'s rows, read at stream positions ``pos`` (increasing), and advance the
        stream to ``end`` (exclusive) unless a cutoff stops it first; returns atoms added."""
        start = time.perf_counter()
        self.n_batches += 1
        before = len(self.store)
        x = batch.acts.to(self.store.device, self.store.dtype)
        keep = (batch.eligible.to(x.device) & (x.norm(dim=1) > 0)).cpu()
        rows = keep.nonzero().flatten()
        if self.cfg.add_rule == "exact":
            self._exact(x, rows, pos, batch, end)
        else:
            self._batch(x, rows, pos, batch, end)
        self.seconds += time.perf_counter() - start
        return len(self.store) - before

    def _finish_batch(self, end: int) -> None:
        """Reading went to ``end`` (exclusive), or to the cutoff if that came first."""
        self._read_until(int(min(end - 1, self._cutoff())))

    def _read_until(self, last: int) -> None:
        """Advance ``tokens_seen`` past stream position ``last`` and record why reading stopped."""
        self.tokens_seen = last + 1
        if self.full:
            self.stop_reason = "full"
        elif self.tokens_seen > self._cutoff():
            self.stop_reason = "converged"

    def _add(self, x: Tensor, j: int, pos: Tensor, batch: ActivationBatch) -> None:
        dev = self.store.device
        self.store.add(
            x[j : j + 1], batch.labels[j : j + 1].to(dev), batch.token_ids[j : j + 1].to(dev)
        )
        self.added_at.append(int(pos[j]))
        self.added(x, torch.tensor([j]), batch)

    def added(self, x: Tensor, rows: Tensor, batch: ActivationBatch) -> None:
        """Rows ``rows`` of ``x`` (this batch's inputs) just became atoms, in order: a hook for
        builders that keep more per atom (the transcoder's output atoms)."""

    # --- the exact sequential rule ----------------------------------------------------------

    def _exact(
        self, x: Tensor, rows: Tensor, pos: Tensor, batch: ActivationBatch, end: int
    ) -> None:
        if self.use_kernel:
            self._exact_kernel(x, rows, pos, batch)
            if not self.full:
                self._finish_batch(end)
            return
        i = 0  # index into rows
        while i < len(rows) and not self.full:
            cutoff = self._cutoff()
            if pos[rows[i]] > cutoff:
                break
            stop = min(i + self._sub, len(rows))
            if cutoff < math.inf:  # rows past the cutoff are read only if an atom comes first
                stop = min(
                    stop, i + int(torch.searchsorted(pos[rows[i:stop]], int(cutoff), right=True))
                )
            sub = rows[i:stop]
            with _threads(1 if len(sub) <= SINGLE_THREAD_TOKENS else None):
                added, last = self._resolve(x, sub, pos, batch)
            self.tokens_scored += int((sub <= last).sum())
            if self.full:
                self._read_until(int(pos[last]))
                return
            # adapt the sub-batch to the acceptance rate (a speed choice; verdicts do not depend on it)
            if added * 16 > len(sub):
                self._sub = max(MIN_SUB_BATCH, self._sub // 2)
            elif added * 256 < len(sub):
                self._sub = min(MAX_SUB_BATCH, self._sub * 2)
            i = stop
        self._finish_batch(end)

    @property
    def use_kernel(self) -> bool:
        """Whether the exact rule runs in the CPU kernel (MP on CPU, backend "auto")."""
        return self.cfg.encoder == "mp" and self.store.kernel_ok and self.backend == "auto"

    def _exact_kernel(self, x: Tensor, rows: Tensor, pos: Tensor, batch: ActivationBatch) -> None:
        """The exact rule in the CPU kernel, sub-batch by sub-batch, to the end of ``rows``, the
        cutoff, or full (``tokens_seen`` is then set). Past the Gram budget the rows are a cache:
        each sub-batch's rows are fetched first by encoding it, and a row still missing stops the
        kernel, is computed, and the kernel resumes at that token."""
        store, i, k = self.store, 0, self.cfg.k
        eps = float(torch.finfo(store.dtype).eps)
        p = self.cfg.patience_tokens
        limit = self.cfg.max_atoms
        d = x.shape[1]
        while i < len(rows):
            n0 = len(store)
            lo, hi = KERNEL_SUB_BATCH
            size = max(lo, min(hi, KERNEL_CORR_BYTES // (max(n0, 1) * x.element_size())))
            sub = rows[i : i + size]
            xs = x[sub].contiguous()
            store.reserve(n0 + len(sub))
            atoms, gram = store.buffers()
            if n0 and not gram.full:  # fetch the rows this sub-batch will pick, in few GEMMs
                pursue("mp", xs, store.atoms, k, gram=gram, backend="kernel")
            corr0 = (xs @ store.atoms.T).contiguous()
            cap = atoms.shape[0]
            dt = xs.numpy().dtype
            itype = np.int64 if dt == np.float64 else np.int32
            c = np.empty(cap, dtype=dt)
            scr = np.zeros(1, dtype=dt)
            accepted = np.empty(len(sub), dtype=np.int64)
            work = (
                c, c.view(itype), itype(np.iinfo(itype).max), np.empty(cap, dtype=dt),
                np.empty(d, dtype=dt), np.empty(k, dtype=np.int64), np.empty(k, dtype=dt),
                np.empty((cap + kernels.BLOCK - 1) // kernels.BLOCK, dtype=itype), scr,
                scr.view(itype), np.zeros(2, dtype=np.int64), gram.uses.numpy(), accepted,
            )  # fmt: skip
            start, n, step, bound = 0, n0, 0, 0.0
            while True:
                cutoff = self._cutoff()
                added, start, _, need, step, bound = kernels.exact_mp(
                    xs.numpy(), corr0.numpy(), n0, n, atoms.numpy(), gram.q.numpy(),
                    gram.slot.numpy(), gram.owner.numpy(), gram.error, eps, k,
                    pursuit.MAX_CANDIDATES, self.cfg.cos_threshold,
                    self.cfg.cos_threshold + EARLY_MARGIN[store.dtype], pos[sub].numpy(),
                    np.int64(min(cutoff, 2**62)), -1 if p is None else p,
                    -1 if limit is None else limit - n0, start, step, bound, *work,
                )  # fmt: skip
                new = sub[torch.from_numpy(accepted[n - n0 : added])]
                store.commit(batch.labels[new], batch.token_ids[new])
                self.added_at.extend(pos[new].tolist())
                self.added(x, new, batch)
                n = n0 + added
                if need < 0:
                    break
                gram.ensure(torch.tensor([need]), store.atoms)
            self.tokens_scored += start
            if self.full:
                self._read_until(int(pos[sub[accepted[added - 1]]]))
                return
            if start < len(sub):  # the next row lies past the cutoff
                return
            i += len(sub)

    def _resolve(
        self, x: Tensor, sub: Tensor, pos: Tensor, batch: ActivationBatch
    ) -> tuple[int, int]:
        """Judge the rows ``sub`` of ``x`` in order; returns (atoms added, last row judged)."""
        xs = x[sub]
        ys = None if batch.outputs is None else batch.outputs[sub].to(x)
        T = xs.shape[0]
        paths = self.score(xs, ys)
        self.steps += 1
        valid = torch.full((T,), len(self.store) > 0, dtype=torch.bool)
        tol = xs.norm(dim=1) * self.tolerance_factor
        added, i = 0, 0
        while i < T:
            self.steps += 1
            todo = (~valid[i:] | paths.accept[i:]).nonzero()
            if todo.numel() == 0:
                break
            j = i + int(todo[0])
            if not bool(valid[j]):  # an atom added since it was scored enters its path: re-pursue
                again = j + (~valid[j:]).nonzero().flatten()
                paths.put(again, self.score(xs[again], None if ys is None else ys[again]))
                valid[again] = True
                if not bool(paths.accept[j]):
                    i = j + 1
                    continue
            self._add(x, int(sub[j]), pos, batch)
            added += 1
            if self.full:
                return added, int(sub[j])
            later = j + 1 + valid[j + 1 :].nonzero().flatten()
            if later.numel():
                valid[later[self.enters(xs[later], paths, later, tol[later])]] = False
            i = j + 1
        return added, int(sub[-1])

    def score(self, xs: Tensor, ys: Tensor | None = None) -> Paths:
        """Pursue ``xs`` over the current dictionary (an empty one accepts everything); ``ys``
        are the rows' outputs, for a builder whose verdict reads them (:meth:`poor`)."""
        T, k = xs.shape[0], self.cfg.k
        omp = self.cfg.encoder == "omp"
        if len(self.store) == 0:
            return Paths(
                torch.zeros(T, k, dtype=torch.long, device=xs.device),
                xs.new_zeros(T, k),
                xs.new_full((T, k), -math.inf),
                xs.new_zeros(T, k, k) if omp else None,
                torch.ones(T, dtype=torch.bool),
            )
        atoms = self.store.atoms
        code, trace = pursue(
            self.cfg.encoder, xs, atoms, k, gram=self.store.rows, trace=omp, backend=self.backend
        )
        return Paths(
            code.indices,
            code.values,
            trace.peaks if trace is not None else code.values.abs(),
            trace.coefs if trace is not None else None,
            self.poor(xs, ys, code).cpu(),
        )

    def poor(self, xs: Tensor, ys: Tensor | None, code: SparseCode) -> Tensor:
        """The verdict from the rows' codes: ``cos(x, x_hat) < cos_threshold``. It depends on the
        dictionary only through the code, which is what makes sub-batch scoring exact."""
        cos = F.cosine_similarity(xs, decode(code, self.store.atoms), dim=1, eps=1e-30)
        return cos < self.cfg.cos_threshold

    @property
    def tolerance_factor(self) -> float:
        """Margin (relative to |x|) within which an atom is assumed to enter a path: far above
        the rounding of the decision dtype, so that a re-pursuit is never missed."""
        return math.sqrt(torch.finfo(self.store.dtype).eps) * 4

    def enters(self, xs: Tensor, paths: Paths, rows: Tensor, tol: Tensor, atom: int = -1) -> Tensor:
        """Which of these tokens' paths the atom (default: the newest) would enter
        (conservatively, within ``tol``)."""
        atom = atom % len(self.store)
        new = self.store.atoms[atom]
        row = self.store.gram_row(atom)
        corr = xs @ new
        idx = paths.idx[rows]
        g = row[idx]  # <atom picked at step s, new atom>
        if paths.coefs is None:  # MP: the residual before step t is x - sum_{s<t} v_s a_s
            w = paths.val[rows] * g
            before = corr.unsqueeze(1) - (w.cumsum(dim=1) - w)
        else:
            before = corr.unsqueeze(1) - (paths.coefs[rows] * g.unsqueeze(1)).sum(dim=-1)
        return (before.abs() > paths.peaks[rows] - tol.unsqueeze(1)).any(dim=1).cpu()

    # --- the reference code's batch rule ------------------------------------------------------

    def _batch(
        self, x: Tensor, rows: Tensor, pos: Tensor, batch: ActivationBatch, end: int
    ) -> None:
        cutoff = self._cutoff()
        if cutoff < math.inf:
            rows = rows[pos[rows] <= cutoff]
        xs = x[rows]
        self.tokens_scored += xs.shape[0]
        cand = self.score(xs).accept.nonzero().flatten()
        self.steps += 1 + math.ceil(len(cand) / DISTINCT_BLOCK)
        limit = math.inf if self.cfg.max_atoms is None else self.cfg.max_atoms - len(self.store)
        sel = cand[_greedy_distinct(F.normalize(xs[cand], dim=1), self.cfg.cos_threshold, limit)]
        if sel.numel():
            dev = self.store.device
            r = rows[sel]
            self.store.add(x[r], batch.labels[r].to(dev), batch.token_ids[r].to(dev))
            self.added_at.extend(pos[r].tolist())
            self.added(x, r, batch)
        if self.full:
            self._read_until(int(pos[rows[sel[-1]]]))
        else:
            self._finish_batch(end)

    # --- results ------------------------------------------------------------------------------

    def atom_options(self) -> dict[str, Any]:
        """What an SAE made of these atoms takes besides them (provenance, encoder, the config's
        dtype); refuses an empty dictionary."""
        if len(self.store) == 0:
            raise ValueError(
                "empty dictionary: no activation was eligible to become an atom "
                "(all inputs were excluded tokens or zero vectors?)"
            )
        return {
            "labels": self.store.labels,
            "token_ids": self.store.token_ids,
            "encoder": self.cfg.encoder,
            "dtype": self.cfg.torch_dtype,
        }

    def to_itda(self, **from_atoms_kwargs: Any) -> ITDA:
        """The dictionary as an ITDA (an sae_lens SAE) in the config's dtype."""
        options = self.atom_options()
        return ITDA.from_atoms(self.store.atoms, self.cfg.k, **options, **from_atoms_kwargs)

    def growth(self) -> list[list[int]]:
        """(tokens read, atoms) after each atom (thinned geometrically) and at the end."""
        n = len(self.added_at)
        counts = range(1, n + 1) if n <= GROWTH_POINTS else np.geomspace(1, n, GROWTH_POINTS)
        keep = sorted({round(float(v)) for v in counts} | {n})
        points = [[self.added_at[c - 1] + 1, c] for c in keep if 1 <= c <= n]
        if not points or points[-1][0] != self.tokens_seen:
            points.append([self.tokens_seen, n])
        return points

    def record(
        self,
        *,
        hook_name: str | None,
        config: BuildConfig,
        stream: StreamRecord,
        forward_seconds: float,
        world_size: int = 1,
        wire_bytes: int = 0,
        excluded_token_ids: Sequence[int] = (),
        search: SearchRecord | None = None,
    ) -> BuildRecord:
        """The typed record of this build (``config``: the settings as given; the threshold this
        builder used may have been searched)."""
        return BuildRecord(
            hook_name=hook_name,
            config=config.to_dict(),
            cos_threshold=self.cfg.cos_threshold,
            n_atoms=len(self.store),
            tokens_seen=self.tokens_seen,
            tokens_scored=self.tokens_scored,
            batches=self.n_batches,
            stop_reason=self.stop_reason,
            growth=self.growth(),
            dictionary_seconds=round(self.seconds, 3),
            forward_seconds=round(forward_seconds, 3),
            stream=stream,
            world_size=world_size,
            wire_bytes=wire_bytes,
            excluded_token_ids=list(excluded_token_ids),
            search=search,
        )

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this build exactly: the atoms, labels and token ids
        (tensors, on CPU) and the progress fields (JSON-able, under ``"fields"``)."""
        return {
            "atoms": self.store.atoms.detach().cpu().contiguous(),
            "labels": self.store.labels.cpu().contiguous(),
            "token_ids": self.store.token_ids.cpu().contiguous(),
            "fields": {
                "d_in": self.d_in,
                "blocks": list(self.store.blocks),
                **{name: getattr(self, name) for name in _PROGRESS},
                "added_at": list(self.added_at),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (atoms restored in the decision dtype; the Gram rows
        are recomputed, which never changes a verdict)."""
        f = state["fields"]
        if f["d_in"] != self.d_in:
            raise ValueError(
                f"d_in mismatch: the state holds {f['d_in']}-d atoms, this builder {self.d_in}"
            )
        self.store = AtomStore.restore(
            state["atoms"],
            state["labels"],
            state["token_ids"],
            list(f["blocks"]),
            device=self.store.device,
            dtype=self.store.dtype,
            budget=self.store.budget,
            max_atoms=self.cfg.max_atoms,
        )
        for name in _PROGRESS:
            setattr(self, name, f[name])
        self.added_at = list(f["added_at"])

    def snapshot(self) -> BuilderSnapshot:
        """A cheap mark to :meth:`rollback` to (atoms are only ever appended)."""
        return BuilderSnapshot(
            len(self.store),
            len(self.store.blocks),
            len(self.added_at),
            tuple(getattr(self, name) for name in _PROGRESS),
        )

    def rollback(self, snap: BuilderSnapshot) -> None:
        """Forget everything read since ``snap``."""
        self.store.truncate(snap.n_atoms, snap.n_blocks)
        del self.added_at[snap.n_added :]
        for name, value in zip(_PROGRESS, snap.progress, strict=True):
            setattr(self, name, value)


#: the builder's progress fields besides its atoms (what checkpoints and snapshots carry)
_PROGRESS = ("tokens_seen", "tokens_scored", "n_batches", "stop_reason", "_sub", "seconds")


class BuilderSnapshot(NamedTuple):
    """Where a builder was (see :meth:`ITDABuilder.snapshot`)."""

    n_atoms: int
    n_blocks: int
    n_added: int
    progress: tuple[Any, ...]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: as they are), then restore."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _greedy_distinct(
    units: Float[Tensor, "c d"], threshold: float, limit: float, block: int = DISTINCT_BLOCK
) -> Int[Tensor, " s"]:
    """Indices of candidates kept in order, skipping any with |cos| >= threshold to one kept before."""
    kept: list[int] = []
    kept_units = units[:0]
    for start in range(0, units.shape[0], block):
        if len(kept) >= limit:
            break
        u = units[start : start + block]
        alive = np.ones(u.shape[0], dtype=bool)
        if kept_units.shape[0]:
            alive &= ((u @ kept_units.T).abs() < threshold).all(dim=1).cpu().numpy()
        close = ((u @ u.T).abs() >= threshold).cpu().numpy()
        new: list[int] = []
        for i in np.flatnonzero(alive):
            if not alive[i]:
                continue
            new.append(int(i))
            if len(kept) + len(new) >= limit:
                break
            alive &= ~close[i]
        kept.extend(start + i for i in new)
        kept_units = torch.cat([kept_units, u[new]])
    return torch.tensor(kept, dtype=torch.long, device=units.device)
