"""Streaming per-latent statistics for dashboards, in bounded memory (no dense tokens x latents).

Codes arrive chunk by chunk as coalesced sparse entries (token row, latent, value). Kept per latent:
firing count and summed |value|; the top-``K`` entries by |value| and a uniform reservoir sample of
``R`` firings (the same fixed-size merge, keyed by |value| or by a random key), each with the
latent's values on a window of tokens around it; a signed linear histogram whose range doubles as
larger values arrive; and co-firing counts over the first tokens (up to a budget of pairs).
Memory is ``O(d_sae * (K + R) * window)`` plus the co-firing pairs, whatever the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Bins of each sign's half of a latent's histogram.
HIST_BINS = 24
#: Latent pairs formed at once while counting co-firing (bounds the [rows, L, L] temporaries).
COFIRE_CHUNK = 2**22
#: Entries whose windows are gathered at once (bounds the [E, window, L] temporaries).
WINDOW_CHUNK = 4096


class SparseEntries(NamedTuple):
    """Non-zero codes of a chunk: ``row`` (token row in the chunk), ``latent``, ``value``."""

    row: Int[Tensor, " m"]
    latent: Int[Tensor, " m"]
    value: Float[Tensor, " m"]


def coalesce(
    indices: Int[Tensor, "n L"], values: Float[Tensor, "n L"], d_sae: int
) -> SparseEntries:
    """Sum the slots naming the same latent in a row (MP may pick an atom twice); drop zeros."""
    n, L = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(L)
    keys = rows * d_sae + indices.reshape(-1)
    uniq, inv = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(uniq.shape[0], dtype=values.dtype, device=values.device)
    summed.index_add_(0, inv, values.reshape(-1))
    live = summed != 0
    uniq, summed = uniq[live], summed[live]
    return SparseEntries(uniq // d_sae, uniq % d_sae, summed)


def ranked_by_group(
    group: Int[Tensor, " m"], n_groups: int, key: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries sorted by group (within a group by ``key``, largest first; else in input order):
    ``(order, group[order], rank within the group)``."""
    order = torch.arange(group.shape[0], device=group.device)
    if key is not None:
        order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    counts = torch.bincount(g, minlength=n_groups)
    rank = torch.arange(g.shape[0], device=g.device) - (torch.cumsum(counts, 0) - counts)[g]
    return order, g, rank


def padded(entries: SparseEntries, n_rows: int) -> tuple[Tensor, Tensor]:
    """Entries as per-row slots ``(latents [n, L], values [n, L])``, zero-padded (value 0)."""
    order, row, slot = ranked_by_group(entries.row, n_rows)
    L = max(1, int(slot.max()) + 1 if slot.numel() else 1)
    lat = torch.zeros(n_rows, L, dtype=torch.long, device=row.device)
    val = torch.zeros(n_rows, L, dtype=entries.value.dtype, device=row.device)
    lat[row, slot] = entries.latent[order]
    val[row, slot] = entries.value[order]
    return lat, val


@dataclass
class Reservoir:
    """Per-latent fixed-size set of entries with the largest keys, with their context windows."""

    d_sae: int
    size: int
    width: int
    key: Tensor = field(init=False)
    value: Tensor = field(init=False)
    where: Tensor = field(init=False)
    window: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.key = torch.full((self.d_sae, self.size), -math.inf)
        self.value = torch.zeros(self.d_sae, self.size)
        self.where = torch.full((self.d_sae, self.size), -1, dtype=torch.long)
        self.window = torch.zeros(self.d_sae, self.size, self.width, dtype=torch.float16)

    def merge(self, entries: SparseEntries, key: Tensor, where: Tensor, windows: WindowFn) -> None:
        """Keep each latent's ``size`` largest keys among the kept ones and ``entries``; windows
        are gathered only for entries that get in."""
        if entries.latent.numel() == 0:
            return
        # the chunk's own top-`size` per latent, in a dense [d_sae, size] block
        order, lat, rank = ranked_by_group(entries.latent, self.d_sae, key)
        keep = rank < self.size
        order, lat, rank = order[keep], lat[keep], rank[keep]
        new_key = torch.full_like(self.key, -math.inf)
        new_key[lat, rank] = key[order]
        src = torch.full((self.d_sae, self.size), -1, dtype=torch.long)
        src[lat, rank] = order
        both = torch.cat([self.key, new_key], dim=1)
        top = torch.topk(both, self.size, dim=1).indices  # ties keep the older entry
        from_new = top >= self.size
        pick = (top - self.size).clamp_min(0)
        chosen = torch.gather(src, 1, pick)
        take = from_new & (chosen >= 0)
        old = top.clamp_max(self.size - 1)
        self.key = torch.gather(both, 1, top)
        self.value = torch.gather(self.value, 1, old)
        self.where = torch.gather(self.where, 1, old)
        self.window = torch.gather(self.window, 1, old.unsqueeze(-1).expand(-1, -1, self.width))
        if bool(take.any()):
            lat_i, slot = take.nonzero(as_tuple=True)
            e = chosen[lat_i, slot]
            self.value[lat_i, slot] = entries.value[e].float()
            self.where[lat_i, slot] = where[e]
            self.window[lat_i, slot] = windows(entries.row[e], entries.latent[e]).half()


class WindowFn:
    """A latent's values on the window of rows around given rows of a chunk (same sequence only)."""

    def __init__(
        self,
        lat: Int[Tensor, "n L"],
        val: Float[Tensor, "n L"],
        seq: Int[Tensor, " n"],
        before: int,
        after: int,
    ):
        self.lat, self.val, self.seq = lat, val, seq
        self.offsets = torch.arange(-before, after + 1)

    def __call__(self, rows: Int[Tensor, " e"], latents: Int[Tensor, " e"]) -> Tensor:
        n = self.lat.shape[0]
        out = []
        for s in range(0, rows.shape[0], WINDOW_CHUNK):
            r, a = rows[s : s + WINDOW_CHUNK], latents[s : s + WINDOW_CHUNK]
            pos = r.unsqueeze(1) + self.offsets
            ok = (pos >= 0) & (pos < n)
            pos = pos.clamp(0, n - 1)
            ok &= self.seq[pos] == self.seq[r].unsqueeze(1)
            hit = self.lat[pos] == a[:, None, None]
            out.append((self.val[pos] * hit).sum(-1).float() * ok)
        return torch.cat(out)


@dataclass
class LatentStats:
    """Everything a dashboard shows about each latent, accumulated chunk by chunk."""

    d_sae: int
    top_k: int = 10
    samples: int = 24
    before: int = 10
    after: int = 4
    cofire_pairs: int = 20_000_000
    seed: int = 0
    n_tokens: int = 0
    count: Tensor = field(init=False)
    abs_sum: Tensor = field(init=False)
    hist: Tensor = field(init=False)
    hist_exp: Tensor = field(init=False)
    co_keys: Tensor = field(init=False)
    co_counts: Tensor = field(init=False)
    co_fired: Tensor = field(init=False)
    co_tokens: int = 0
    pairs_seen: int = 0

    def __post_init__(self) -> None:
        width = self.before + self.after + 1
        self.top = Reservoir(self.d_sae, self.top_k, width)
        self.sample = Reservoir(self.d_sae, self.samples, width)
        self.count = torch.zeros(self.d_sae, dtype=torch.long)
        self.abs_sum = torch.zeros(self.d_sae, dtype=torch.float64)
        self.hist = torch.zeros(self.d_sae, 2, HIST_BINS, dtype=torch.long)
        self.hist_exp = torch.full((self.d_sae,), -(2**30), dtype=torch.long)
        self.co_keys = torch.zeros(0, dtype=torch.long)
        self.co_counts = torch.zeros(0, dtype=torch.long)
        self.co_fired = torch.zeros(self.d_sae, dtype=torch.long)
        self._gen = torch.Generator().manual_seed(self.seed)

    def update(
        self,
        entries: SparseEntries,
        n_rows: int,
        where: Int[Tensor, " n"],
        seq: Int[Tensor, " n"],
        n_kept: int,
    ) -> None:
        """Add a chunk of ``n_rows`` token rows: ``where[row]`` is each row's global token index,
        ``seq[row]`` its sequence (windows do not cross sequences); ``n_kept`` rows count as read."""
        self.n_tokens += n_kept
        lat, val = entries.latent, entries.value
        self.count += torch.bincount(lat, minlength=self.d_sae)
        self.abs_sum.index_add_(0, lat, val.abs().double())
        self._histogram(lat, val.float())
        slots = padded(entries, n_rows)
        windows = WindowFn(*slots, seq, self.before, self.after)
        w = where[entries.row]
        self.top.merge(entries, val.abs().float(), w, windows)
        key = torch.rand(lat.shape[0], generator=self._gen)
        self.sample.merge(entries, key, w, windows)
        if self.pairs_seen < self.cofire_pairs:
            self._cofire(slots[0], slots[1] != 0, n_kept)

    def _histogram(self, lat: Tensor, val: Tensor) -> None:
        mag = val.abs()
        peak = torch.zeros(self.d_sae).scatter_reduce(0, lat, mag, "amax")
        need = torch.ceil(torch.log2(peak.clamp_min(1e-30))).long()
        seen = peak > 0
        fresh = seen & (self.hist.sum(dim=(1, 2)) == 0)
        self.hist_exp[fresh] = need[fresh]
        while True:
            grow = seen & (need > self.hist_exp)
            if not bool(grow.any()):
                break
            h = self.hist[grow]  # merge bin pairs: the range doubles
            merged = h.view(*h.shape[:-1], HIST_BINS // 2, 2).sum(-1)
            self.hist[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=-1)
            self.hist_exp[grow] += 1
        scale = torch.pow(2.0, self.hist_exp[lat].double()).float()
        b = (mag / scale * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        flat = (lat * 2 + (val > 0).long()) * HIST_BINS + b
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _cofire(self, lat: Tensor, live: Tensor, n_kept: int) -> None:
        rows = live.any(dim=1)
        lat, live = lat[rows], live[rows]
        L = lat.shape[1]
        step = max(1, COFIRE_CHUNK // (L * L))
        new = []
        for s in range(0, lat.shape[0], step):
            a = lat[s : s + step].unsqueeze(2).expand(-1, -1, L)
            b = lat[s : s + step].unsqueeze(1).expand(-1, L, -1)
            lv = live[s : s + step]
            ok = lv.unsqueeze(2) & lv.unsqueeze(1) & (a < b)
            new.append(a[ok] * self.d_sae + b[ok])
        keys = torch.cat(new) if new else self.co_keys[:0]
        self.pairs_seen += int(keys.numel())
        self.co_tokens += n_kept
        self.co_fired += torch.bincount(lat[live], minlength=self.d_sae)
        counts = torch.cat([self.co_counts, torch.ones_like(keys)])
        self.co_keys, inv = torch.unique(torch.cat([self.co_keys, keys]), return_inverse=True)
        self.co_counts = torch.zeros_like(self.co_keys).index_add_(0, inv, counts)

    # --- results --------------------------------------------------------------------------------

    def cofiring(self, n: int = 6) -> tuple[Tensor, Tensor]:
        """Each latent's ``n`` most co-firing partners by Jaccard index over the co-firing sample:
        ``(partners [d_sae, n] (-1 = none), jaccard [d_sae, n])``."""
        i, j = self.co_keys // self.d_sae, self.co_keys % self.d_sae
        c = self.co_counts.double()
        jac = c / (self.co_fired[i] + self.co_fired[j] - c).double()
        # both directions, then per-latent top-n
        src = torch.cat([i, j])
        dst = torch.cat([j, i])
        score = torch.cat([jac, jac])
        partners = torch.full((self.d_sae, n), -1, dtype=torch.long)
        scores = torch.zeros(self.d_sae, n, dtype=torch.float64)
        if src.numel() == 0:
            return partners, scores
        order, s, rank = ranked_by_group(src, self.d_sae, score)
        keep = rank < n
        partners[s[keep], rank[keep]] = dst[order][keep]
        scores[s[keep], rank[keep]] = score[order][keep]
        return partners, scores

    def histogram(self, latent: int) -> dict[str, object]:
        """The latent's histogram: bin edges' scale and signed counts (negative bins reversed, so
        the list runs from -max to +max)."""
        h = self.hist[latent]
        top = math.ldexp(1.0, int(self.hist_exp[latent])) if int(self.count[latent]) else 0.0
        return {"max": top, "neg": h[0].flip(0).tolist(), "pos": h[1].tolist()}
