"""Streaming dashboard statistics against a dense, obviously-correct transcription."""

from __future__ import annotations

import pytest
import torch

from itda_lens.dashboard.stats import HIST_BINS, LatentStats, SparseEntries, coalesce


def _stream(n_seq: int = 12, seq_len: int = 20, d_sae: int = 30, L: int = 4, seed: int = 0):
    """Random sparse codes [n_seq * seq_len, L] with repeated slots (as MP produces)."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * seq_len
    idx = torch.randint(0, d_sae, (n, L), generator=g)
    val = torch.randn(n, L, generator=g) * torch.rand(n, 1, generator=g) * 10
    val[torch.rand(n, L, generator=g) < 0.2] = 0
    return idx, val, n_seq, seq_len, d_sae


def _dense(idx: torch.Tensor, val: torch.Tensor, d_sae: int) -> torch.Tensor:
    dense = torch.zeros(idx.shape[0], d_sae)
    for r in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            dense[r, idx[r, j]] += val[r, j]
    return dense


def _run(idx, val, n_seq, seq_len, d_sae, chunk_seqs: int, **kw) -> LatentStats:
    stats = LatentStats(d_sae, **kw)
    rows_per = chunk_seqs * seq_len
    for start in range(0, idx.shape[0], rows_per):
        i, v = idx[start : start + rows_per], val[start : start + rows_per]
        e = coalesce(i, v, d_sae)
        n = i.shape[0]
        g = torch.arange(start, start + n)
        stats.update(e, n, g, g // seq_len, n)
    return stats


def test_coalesce_sums_repeated_slots_and_drops_zeros() -> None:
    idx = torch.tensor([[1, 1, 2], [0, 3, 3]])
    val = torch.tensor([[1.0, 2.0, 0.0], [4.0, 1.0, -1.0]])
    e = coalesce(idx, val, 5)
    got = sorted(zip(e.row.tolist(), e.latent.tolist(), e.value.tolist(), strict=True))
    assert got == [(0, 1, 3.0), (1, 0, 4.0)]


@pytest.mark.parametrize("chunk_seqs", [1, 5, 12])
def test_streaming_stats_match_dense(chunk_seqs: int) -> None:
    idx, val, n_seq, seq_len, d_sae = _stream()
    dense = _dense(idx, val, d_sae)
    K, before, after = 3, 2, 1
    stats = _run(idx, val, n_seq, seq_len, d_sae, chunk_seqs, top_k=K, before=before, after=after)
    fires = dense != 0
    assert stats.count.tolist() == fires.sum(0).tolist()
    torch.testing.assert_close(stats.abs_sum.float(), dense.abs().sum(0), rtol=1e-5, atol=1e-4)
    assert stats.n_tokens == dense.shape[0]
    for lat in range(d_sae):
        col = dense[:, lat].abs()
        want = torch.sort(col[col > 0], descending=True).values[:K]
        got = torch.sort(stats.top.key[lat][stats.top.key[lat] > -torch.inf], descending=True)
        torch.testing.assert_close(got.values, want)
        for slot in range(K):
            g = int(stats.top.where[lat, slot])
            if g < 0 or stats.top.key[lat, slot] == -torch.inf:
                continue
            assert stats.top.value[lat, slot] == pytest.approx(float(dense[g, lat]), abs=1e-5)
            s, p = divmod(g, seq_len)
            for o, a in zip(range(-before, after + 1), stats.top.window[lat, slot], strict=True):
                q = p + o
                want_a = float(dense[s * seq_len + q, lat]) if 0 <= q < seq_len else 0.0
                assert float(a) == pytest.approx(want_a, rel=1e-3, abs=1e-3)
        # the histogram holds every firing, in range, with the right signs
        h = stats.hist[lat]
        assert int(h.sum()) == int(fires[:, lat].sum())
        assert int(h[1].sum()) == int((dense[:, lat] > 0).sum())
        if fires[:, lat].any():
            top = 2.0 ** int(stats.hist_exp[lat])
            assert col.max() <= top < 2 * col.max() * 2


def test_histogram_bins_match_dense_counts_at_the_final_range() -> None:
    idx, val, n_seq, seq_len, d_sae = _stream(seed=3)
    dense = _dense(idx, val, d_sae)
    stats = _run(idx, val, n_seq, seq_len, d_sae, 2)
    for lat in range(d_sae):
        v = dense[:, lat]
        v = v[v != 0]
        if v.numel() == 0:
            continue
        top = 2.0 ** int(stats.hist_exp[lat])
        # ranges double by merging bin pairs: counts equal binning at the final range directly,
        # except values that fell on a bin edge of an earlier, finer range (none with random data)
        b = (v.abs() / top * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        want_pos = torch.bincount(b[v > 0], minlength=HIST_BINS)
        want_neg = torch.bincount(b[v < 0], minlength=HIST_BINS)
        assert stats.hist[lat, 1].tolist() == want_pos.tolist()
        assert stats.hist[lat, 0].tolist() == want_neg.tolist()


def test_reservoir_is_a_uniform_sample_of_firings() -> None:
    # one latent firing on every row with value = row: the sample's mean row is near the middle
    n, d_sae, R = 4000, 1, 200
    stats = LatentStats(d_sae, top_k=2, samples=R, seed=1)
    for start in range(0, n, 500):
        rows = torch.arange(500)
        e = SparseEntries(rows, torch.zeros(500, dtype=torch.long), (rows + start + 1).float())
        g = rows + start
        stats.update(e, 500, g, g // 50, 500)
    vals = stats.sample.value[0]
    assert stats.sample.where[0].unique().numel() == R
    assert abs(float(vals.mean()) - n / 2) < 0.1 * n  # uniform: mean n/2, sd of the mean ~ 80
    assert stats.top.value[0].tolist() == [4000.0, 3999.0]


def test_cofiring_jaccard_matches_dense() -> None:
    idx, val, n_seq, seq_len, d_sae = _stream(seed=5)
    dense = _dense(idx, val, d_sae) != 0
    stats = _run(idx, val, n_seq, seq_len, d_sae, 4)
    partners, scores = stats.cofiring(n=3)
    inter = dense.T.float() @ dense.float()
    union = dense.sum(0)[:, None] + dense.sum(0)[None, :] - inter
    jac = (inter / union.clamp_min(1)).fill_diagonal_(-1)
    for lat in range(d_sae):
        for j, s in zip(partners[lat].tolist(), scores[lat].tolist(), strict=True):
            if j < 0:
                continue
            assert s == pytest.approx(float(jac[lat, j]), abs=1e-6)
        want = torch.sort(jac[lat][jac[lat] > 0], descending=True).values[:3]
        got = scores[lat][partners[lat] >= 0]
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=0)


def test_cofiring_stops_at_its_pair_budget() -> None:
    idx, val, n_seq, seq_len, d_sae = _stream(seed=6)
    stats = _run(idx, val, n_seq, seq_len, d_sae, 1, cofire_pairs=50)
    assert 0 < stats.co_tokens < n_seq * seq_len
