"""Similarity measures: parity with plain transcriptions, symmetry, range, identity, compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from itda_lens import ITDA, build_itda
from itda_lens.similarity import (
    IncompatibleLabels,
    PairStats,
    aligned_positions,
    jaccard,
    labels_by_span,
    layer_matching_accuracy,
    model_jaccard,
    relative_agreement,
    similarity_matrix,
    span_jaccard,
    span_labels,
)
from tests.helpers import make_model, make_tokens


def paired(
    n: int = 400, dx: int = 12, dy: int = 9, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, dx, generator=g, dtype=torch.float64)
        * torch.linspace(0.2, 3, dx, dtype=torch.float64)
        + 1.5
    )
    y = x[:, :dy] @ torch.randn(dy, dy, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, dy, generator=g, dtype=torch.float64
    )
    return x, y


def stats(
    x: torch.Tensor, y: torch.Tensor, batch: int = 37, anchors: int | None = None
) -> PairStats:
    s = PairStats() if anchors is None else PairStats(anchors_x=x[:anchors], anchors_y=y[:anchors])
    for i in range(0, x.shape[0], batch):
        s.update(x[i : i + batch], y[i : i + batch])
    return s


def cka_plain(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019) linear CKA with the centring matrix H, literally."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def svcca_plain(x: np.ndarray, y: np.ndarray, variance: float = 0.99) -> float:
    """SVD-reduce each centred side to 99% variance, then CCA via QR; mean canonical correlation."""

    def reduce(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        keep = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), variance) + 1)
        return u[:, :keep] * s[:keep]

    qx, _ = np.linalg.qr(reduce(x))
    qy, _ = np.linalg.qr(reduce(y))
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).mean())


def test_linear_cka_matches_the_textbook_formula() -> None:
    x, y = paired()
    assert stats(x, y).linear_cka() == pytest.approx(cka_plain(x.numpy(), y.numpy()), rel=1e-9)


def test_svcca_matches_a_plain_implementation() -> None:
    x, y = paired()
    assert stats(x, y).svcca() == pytest.approx(svcca_plain(x.numpy(), y.numpy()), rel=1e-7)


def test_linreg_r2_matches_sklearn() -> None:
    x, y = paired()
    reg = LinearRegression().fit(x.numpy(), y.numpy())
    expected = r2_score(y.numpy(), reg.predict(x.numpy()), multioutput="variance_weighted")
    assert stats(x, y).linreg_r2() == pytest.approx(expected, rel=1e-9)
    back = LinearRegression().fit(y.numpy(), x.numpy())
    expected_back = r2_score(x.numpy(), back.predict(y.numpy()), multioutput="variance_weighted")
    assert stats(x, y).linreg_r2(reverse=True) == pytest.approx(expected_back, rel=1e-9)


def test_relative_matches_a_loop() -> None:
    x, y = paired(n=60)
    a = 7
    s = stats(x, y, anchors=a)
    per_token = []
    for i in range(x.shape[0]):
        rx = np.array(
            [np.dot(x[i], x[j]) / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for j in range(a)]
        )
        ry = np.array(
            [np.dot(y[i], y[j]) / np.linalg.norm(y[i]) / np.linalg.norm(y[j]) for j in range(a)]
        )
        per_token.append(rx @ ry / np.linalg.norm(rx) / np.linalg.norm(ry))
    assert s.relative() == pytest.approx(float(np.mean(per_token)), rel=1e-9)


@pytest.mark.parametrize("measure", ["linear_cka", "svcca", "relative"])
def test_symmetric_bounded_and_one_on_identical_inputs(measure: str) -> None:
    x, y = paired()
    xy, yx, xx = stats(x, y, anchors=20), stats(y, x, anchors=20), stats(x, x.clone(), anchors=20)
    a, b = getattr(xy, measure)(), getattr(yx, measure)()
    assert a == pytest.approx(b, rel=1e-9) and -1 <= a <= 1 + 1e-9
    assert getattr(xx, measure)() == pytest.approx(1.0, abs=1e-9)


def test_linreg_r2_is_one_on_identical_and_invariant_to_batching() -> None:
    x, y = paired()
    assert stats(x, x).linreg_r2() == pytest.approx(1.0, abs=1e-9)
    assert stats(x, y, batch=400).linreg_r2() == pytest.approx(
        stats(x, y, batch=11).linreg_r2(), rel=1e-10
    )


def test_pair_stats_bad_input() -> None:
    s = PairStats()
    with pytest.raises(ValueError, match="same number of rows"):
        s.update(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least two"):
        s.linear_cka()
    with pytest.raises(ValueError, match="anchors"):
        stats(*paired()).relative()
    assert relative_agreement(torch.eye(3), torch.eye(3), torch.eye(3), torch.eye(3)).allclose(
        torch.ones(3)
    )


@pytest.fixture(scope="module")
def two_builds(tokenizer):
    toks = make_tokens(32)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    a = build_itda(
        make_model(tokenizer, seed=0), toks, hooks, k=4, cos_threshold=0.85, progress=False
    )
    b = build_itda(
        make_model(tokenizer, seed=1), toks, hooks, k=4, cos_threshold=0.85, progress=False
    )
    return a, b, hooks


def test_jaccard_range_symmetry_identity(two_builds) -> None:
    a, b, hooks = two_builds
    x, y = a[hooks[1]], b[hooks[1]]
    assert jaccard(x, x) == 1.0
    assert jaccard(x, y) == jaccard(y, x) and 0 <= jaccard(x, y) < 1
    m = similarity_matrix([a[h] for h in hooks], [b[h] for h in hooks])
    assert m.shape == (2, 2) and ((m >= 0) & (m <= 1)).all()
    assert 0 < model_jaccard([a[h] for h in hooks], [b[h] for h in hooks]) <= 1


def test_incompatible_labels_raise(two_builds, model) -> None:
    a, _, hooks = two_builds
    other = build_itda(
        model, make_tokens(32, seed=5), hooks[1], k=4, cos_threshold=0.85, progress=False
    )[hooks[1]]
    with pytest.raises(IncompatibleLabels, match="first sequences"):
        jaccard(a[hooks[1]], other)
    bare = ITDA.from_atoms(torch.randn(4, 32), k=2)
    with pytest.raises(IncompatibleLabels, match="records no token stream"):
        jaccard(bare, bare)


def test_span_labels_anchor_atoms_to_text() -> None:
    atoms = torch.randn(3, 4)
    labels = torch.tensor([[0, 1], [1, 2], [0, 0]])
    itda = ITDA.from_atoms(atoms, k=1, labels=labels)
    spans = torch.tensor(
        [[[-1, -1, -1], [5, 0, 3], [5, 3, 7]], [[-1, -1, -1], [6, 0, 2], [6, 2, 9]]]
    )
    assert span_labels(itda, spans) == {(5, 3), (6, 9)}
    other = ITDA.from_atoms(atoms[:1], k=1, labels=torch.tensor([[0, 0]]))
    other_spans = torch.tensor(
        [[[5, 0, 3]]]
    )  # another tokenizer: the same text at another position
    assert span_jaccard(itda, spans, other, other_spans) == pytest.approx(1 / 2)
    with pytest.raises(IncompatibleLabels, match="beyond"):
        span_labels(itda, spans[:1])


def _zoo_spans() -> tuple[torch.Tensor, torch.Tensor]:
    """Two tokenizers over the same canonical-order documents (B's windows reach at least as far)."""
    from itda_lens import zoo

    a = zoo.load_token_spans("heldout", 6, tokenizer="bpe2048", shuffle=False)
    b = zoo.load_token_spans("heldout", 8, tokenizer="bpe4096", shuffle=False)
    return a, b


def test_aligned_positions_match_a_plain_transcription() -> None:
    a, b = _zoo_spans()
    first_b: dict[tuple[int, int], tuple[int, int]] = {}
    for s, row in enumerate(b.tolist()):
        for p, (doc, _, end) in enumerate(row):
            if doc >= 0:
                first_b.setdefault((doc, end), (s, p))
    want_a, want_b, seen = [], [], set()
    for s, row in enumerate(a.tolist()):
        for p, (doc, _, end) in enumerate(row):
            if doc >= 0 and (doc, end) in first_b and (doc, end) not in seen:
                seen.add((doc, end))
                want_a.append((s, p))
                want_b.append(first_b[(doc, end)])
    pa, pb = aligned_positions(a, b)
    assert 0 < len(want_a) < (a[..., 0] >= 0).sum()  # some text points are shared, not all
    assert pa.tolist() == [list(x) for x in want_a]
    assert pb.tolist() == [list(x) for x in want_b]
    assert torch.equal(a[pa[:, 0], pa[:, 1]][:, [0, 2]], b[pb[:, 0], pb[:, 1]][:, [0, 2]])


def test_labels_by_span_picks_the_covering_token() -> None:
    a, b = _zoo_spans()
    labels = torch.stack(
        torch.meshgrid(torch.arange(a.shape[0]), torch.arange(1, a.shape[1]), indexing="ij"), -1
    ).reshape(-1, 2)
    got = labels_by_span(labels, a, b)
    tokens_b = [
        (doc, start, end, s, p)
        for s, row in enumerate(b.tolist())
        for p, (doc, start, end) in enumerate(row)
        if doc >= 0
    ]
    for (s, p), (gs, gp) in zip(labels.tolist(), got.tolist(), strict=True):
        doc, _, end = a[s, p].tolist()
        cover = next(t for t in tokens_b if t[0] == doc and t[1] < end <= t[2])
        assert (gs, gp) == (cover[3], cover[4])
    with pytest.raises(IncompatibleLabels, match="no source text"):
        labels_by_span(torch.tensor([[0, 0]]), a, b)
    with pytest.raises(IncompatibleLabels, match="does not cover"):
        labels_by_span(labels, a, b[:1])
    with pytest.raises(ValueError, match="outside the spans"):
        labels_by_span(torch.tensor([[99, 1]]), a, b)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        labels_by_span(torch.zeros(3, dtype=torch.long), a, b)


def test_layer_matching_accuracy_excludes_self_pairs() -> None:
    eye = torch.eye(3)
    shifted = torch.roll(torch.eye(3), 1, dims=1)  # every layer matched to the wrong one
    mats = {
        ("a", "a"): eye,
        ("a", "b"): shifted,
        ("b", "a"): eye,
        ("b", "b"): eye,
        ("a", "c"): torch.ones(3, 4),
    }
    assert layer_matching_accuracy(mats) == pytest.approx(0.5)
    assert layer_matching_accuracy(mats, include_self=True) == pytest.approx(9 / 12)
    with pytest.raises(ValueError, match="no pair"):
        layer_matching_accuracy({("a", "a"): eye})


# --- baselines on a shared sample -------------------------------------------------------------


def _plain_knn(x: np.ndarray, k: int) -> list[set[int]]:
    """Each row's k most cosine-similar other rows, by sorting a Python list (ties: lower index)."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(u)):
        sims = [(-float(u[i] @ u[j]), j) for j in range(len(u)) if j != i]
        out.append({j for _, j in sorted(sims)[:k]})
    return out


def _hsic_u_statistic(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, Theorem 3: the U-statistic over distinct 4-tuples (slow, independent of
    eq. 5's closed form)."""
    from itertools import permutations

    m = len(K)
    total, count = 0.0, 0
    for i, j, q, r in permutations(range(m), 4):
        h = 0.0
        for s, t, u, v in permutations((i, j, q, r)):
            h += K[s, t] * L[s, t] + K[s, t] * L[u, v] - 2 * K[s, t] * L[s, u]
        total += h / 24
        count += 1
    return total / count


def test_mutual_knn_matches_a_plain_transcription() -> None:
    from itda_lens.similarity import mutual_knn

    x, y = paired(n=60, seed=3)
    for k in (1, 5, 10):
        nx, ny = _plain_knn(x.double().numpy(), k), _plain_knn(y.double().numpy(), k)
        plain = np.mean([len(a & b) / k for a, b in zip(nx, ny, strict=True)])
        assert mutual_knn(x, y, k) == pytest.approx(plain, abs=1e-12)
    assert mutual_knn(x, x * 3.0, 10) == 1.0  # cosine neighbours ignore scale
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(x, y, 60)
    with pytest.raises(ValueError, match="same n tokens"):
        mutual_knn(x, y[:-1], 5)


def test_unbiased_hsic_is_the_u_statistic() -> None:
    from itda_lens.similarity import hsic_unbiased

    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 4, generator=g, dtype=torch.float64),
    )
    K, L = a @ a.T, torch.tanh(b @ b.T)
    assert float(hsic_unbiased(K, L)) == pytest.approx(
        _hsic_u_statistic(K.numpy(), L.numpy()), rel=1e-10
    )
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(K[:3, :3], L[:3, :3])


def test_debiased_cka_properties() -> None:
    from itda_lens.similarity import debiased_cka

    x, y = paired(n=200, seed=1)
    q = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    assert debiased_cka(x, x.double() @ q * 5 + 2) == pytest.approx(1.0, abs=1e-10)
    assert debiased_cka(x, y) == pytest.approx(debiased_cka(y, x), abs=1e-12)
    # unrelated wide features: the plug-in CKA is biased well above 0, the debiased one is not
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(100, 500, generator=g), torch.randn(100, 500, generator=g)
    stats = PairStats()
    stats.update(a, b)
    assert stats.linear_cka() > 0.5 and abs(debiased_cka(a, b)) < 0.05
    with pytest.raises(ValueError, match="no variance"):
        debiased_cka(torch.ones(10, 3), y[:10])


def test_cknna_with_every_neighbour_is_debiased_cka_of_the_cosine_kernels() -> None:
    from itda_lens.similarity import cknna, debiased_cka

    x, y = paired(n=80, seed=2)
    unit = torch.nn.functional.normalize
    assert cknna(x, y, k=79) == pytest.approx(
        debiased_cka(unit(x, dim=1), unit(y, dim=1)), abs=1e-10
    )
    assert cknna(x, x * 2.0, k=10) == pytest.approx(1.0, abs=1e-10)
    # a plain transcription with the neighbour sets from sorted lists
    k = 10
    nx, ny = _plain_knn(x.double().numpy(), k), _plain_knn(y.double().numpy(), k)
    ux, uy = unit(x.double(), dim=1).numpy(), unit(y.double(), dim=1).numpy()
    K, L = ux @ ux.T, uy @ uy.T
    n = len(K)
    mk = np.array([[float(j in nx[i]) for j in range(n)] for i in range(n)])
    ml = np.array([[float(j in ny[i]) for j in range(n)] for i in range(n)])

    def h(a: np.ndarray, b: np.ndarray) -> float:  # eq. 5 written out with loops
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        tr = sum(a[i, j] * b[j, i] for i in range(n) for j in range(n))
        ones = a.sum() * b.sum() / ((n - 1) * (n - 2))
        cross = sum(a[i, :] @ b[:, j] for i in range(n) for j in range(n))
        return (tr + ones - 2 * cross / (n - 2)) / (n * (n - 3))

    plain = h(mk * ml * K, mk * ml * L) / np.sqrt(h(mk * K, mk * K) * h(ml * L, ml * L))
    assert cknna(x, y, k) == pytest.approx(plain, abs=1e-10)


def test_procrustes_similarity_matches_scipy() -> None:
    from scipy.linalg import orthogonal_procrustes

    from itda_lens.similarity import procrustes_similarity

    x, _ = paired(n=150, dx=8, dy=8, seed=4)
    g = torch.Generator().manual_seed(9)
    y = x.double() @ torch.randn(8, 8, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        150, 8, generator=g, dtype=torch.float64
    )
    a = (x.double() - x.double().mean(0)).numpy()
    b = (y - y.mean(0)).numpy()
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    r, _ = orthogonal_procrustes(a, b)
    distance2 = np.linalg.norm(a @ r - b) ** 2
    assert procrustes_similarity(x, y) == pytest.approx(1 - distance2 / 2, abs=1e-10)
    q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    assert procrustes_similarity(x, x.double() @ q * 3 - 1) == pytest.approx(1.0, abs=1e-10)


def test_baselines_match_platonic_rep_on_a_fixed_input() -> None:
    """Our shared-sample baselines against numbers computed by the published code, run verbatim
    (not vendored: neither repository ships a licence file; only the outputs are recorded here):

    - Huh et al. 2024, github.com/minyoungg/platonic-rep @ dcd76ba3c950c1b197a2ae8b1c6713535c94ecf9,
      ``metrics.py``: ``AlignmentMetrics.mutual_knn`` / ``cknna`` / ``unbiased_cka``. Its pipeline
      (``measure_alignment.compute_score``) L2-normalises every row before any metric, so those
      were given ``F.normalize(x, dim=-1)``; ``unbiased_cka`` was also run on the raw features.
      (Their ``prepare_features`` also clamps at the 0.95 |activation| quantile first; a
      preprocessing step, not part of the metric, and not applied here.)
    - Ding et al. 2021, github.com/js-d/sim_metric @ 42953fbbf58e70e63c488efbae87cff5df317b6a,
      ``dists/scoring.py``: ``procrustes(A, B)`` on features x samples, each neuron centred and
      each side scaled to unit Frobenius norm as in ``dists/score_pair.score_local_pair``.
    """
    from itda_lens.similarity import (
        cknna,
        debiased_cka,
        hsic_unbiased,
        knn_mask,
        mutual_knn,
        procrustes_similarity,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        40, 5, generator=g, dtype=torch.float64
    )
    unit = torch.nn.functional.normalize
    ux, uy = unit(x, dim=1), unit(y, dim=1)

    # mutual_knn: same definition (self excluded via fill_diagonal_(-1e8), k neighbours, mean of
    # |overlap| / k). Their masks are float32, hence the ~1e-8 rounding in their outputs.
    published_mknn = {1: 0.42500001192092896, 5: 0.5550000071525574, 10: 0.6825000047683716}
    for k, value in published_mknn.items():
        assert mutual_knn(x, y, k) == pytest.approx(value, abs=1e-6)

    # unbiased HSIC: their hsic_unbiased is the same eq. 5 (29.52348871140549 on x x^T, y y^T).
    assert float(hsic_unbiased(x @ x.T, y @ y.T)) == pytest.approx(29.52348871140549, rel=1e-12)

    # unbiased_cka = HSIC_u(K, L) / (sqrt(HSIC_u(K, K) HSIC_u(L, L)) + 1e-6) with linear kernels
    # and no centring: our debiased_cka but for the 1e-6 in the denominator.
    published_ucka = {"raw": 0.7590821712409568, "normalized": 0.7554721093781488}
    for name, (a, b) in {"raw": (x, y), "normalized": (ux, uy)}.items():
        K, L = a @ a.T, b @ b.T
        den = torch.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L))
        assert float(hsic_unbiased(K, L) / (den + 1e-6)) == pytest.approx(
            published_ucka[name], abs=1e-12
        )
    assert debiased_cka(x, y) == pytest.approx(published_ucka["raw"], abs=1e-6)  # diff 2e-8
    assert debiased_cka(ux, uy) == pytest.approx(published_ucka["normalized"], abs=1e-5)

    # cknna: same masks (diagonal set to -inf, torch.topk of k others, intersection for K-L and each
    # side's own mask for K-K and L-L) and the same unbiased HSIC; the only difference is again
    # their + 1e-6 in the denominator. With cosine kernels on 40 tokens the HSIC terms are small
    # (sqrt(kk * ll) = 0.047 at k = 5), so ours is 1e-5 to 2e-5 above theirs; with the epsilon
    # added, our building blocks give their numbers exactly. At k = n - 1 = 39 theirs equals
    # their unbiased_cka on normalised rows, as ours equals debiased_cka.
    published_cknna = {5: 0.6039652062638582, 10: 0.7382682180550825, 39: 0.7554721093781488}
    K, L = ux @ ux.T, uy @ uy.T
    for k, value in published_cknna.items():
        mk, ml = knn_mask(ux, k), knn_mask(uy, k)
        kl = hsic_unbiased(mk * ml * K, mk * ml * L)
        den = torch.sqrt(hsic_unbiased(mk * K, mk * K) * hsic_unbiased(ml * L, ml * L))
        assert float(kl / (den + 1e-6)) == pytest.approx(value, abs=1e-12)
        assert float(kl / den) == pytest.approx(cknna(x, y, k), abs=1e-12)
        assert 0 < cknna(x, y, k) - value < 3e-5

    # Procrustes: sim_metric returns the squared distance ||A||^2 + ||B||^2 - 2 ||A B^T||_* =
    # 2 - 2 * nuclear norm on unit-norm sides; our similarity is that nuclear norm, 1 - d^2 / 2.
    published_procrustes_d2 = 0.28887382870988954
    assert procrustes_similarity(x, y) == pytest.approx(1 - published_procrustes_d2 / 2, abs=1e-9)
    assert procrustes_similarity(y, x) == pytest.approx(1 - published_procrustes_d2 / 2, abs=1e-9)


def test_sample_views_give_the_same_values_as_raw_tensors() -> None:
    from itda_lens.similarity import (
        SampleView,
        cknna,
        debiased_cka,
        mutual_knn,
        procrustes_similarity,
    )

    x, y = paired(n=80, seed=4)
    vx, vy = SampleView(x), SampleView(y)
    for f in (debiased_cka, procrustes_similarity, lambda a, b: mutual_knn(a, b, 7), cknna):
        raw = f(x, y)
        assert f(vx, vy) == raw and f(vx, y) == raw  # and again, from the cached pieces
        assert f(vx, vy) == raw
    with pytest.raises(ValueError, match="NaN"):
        SampleView(torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match="same n tokens"):
        mutual_knn(vx, SampleView(y[:-1]), 5)


def _transfer_plain(a: ITDA, pa: torch.Tensor, pb: torch.Tensor, in_b: torch.Tensor) -> float:
    """decomposition_transfer, token by token: dense MP codes from the paper's literal algorithm."""
    from itda_lens.pursuit import reference_matching_pursuit

    codes = reference_matching_pursuit(pa.to(a.W_dec.dtype), a.W_dec.detach(), a.cfg.k).double()
    mean, scale = pb.mean(0), pb.norm(dim=1).mean()
    total = 0.0
    for t in range(pb.shape[0]):
        guess = sum(
            codes[t, j] * (in_b[j] / in_b[j].norm() - mean / scale)
            for j in codes[t].nonzero().flatten().tolist()
        )
        target = pb[t] - mean
        total += float(guess @ target / (guess.norm() * target.norm()))
    return total / pb.shape[0]


def test_decomposition_transfer_matches_a_plain_transcription(two_builds, tokenizer) -> None:
    from itda_lens.activations import activations_at_labels, hook_activations
    from itda_lens.similarity import decomposition_transfer, transfer_similarity

    a, b, hooks = two_builds
    toks = make_tokens(32)
    probe = make_tokens(4, seed=9)
    model_a, model_b = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)
    pa = hook_activations(model_a, probe, hooks, None)
    pb = hook_activations(model_b, probe, hooks, None)
    xa, xb = (p[hooks[1]].reshape(-1, p[hooks[1]].shape[-1]).double() for p in (pa, pb))
    ia, ib = a[hooks[1]], b[hooks[1]]
    a_in_b = activations_at_labels(model_b, toks, [hooks[1]], ia.atom_labels)[hooks[1]].double()
    b_in_a = activations_at_labels(model_a, toks, [hooks[1]], ib.atom_labels)[hooks[1]].double()
    value = decomposition_transfer(ia, xa, xb, a_in_b)
    assert value == pytest.approx(_transfer_plain(ia, xa, xb, a_in_b), abs=1e-5)
    both = transfer_similarity(ia, ib, xa, xb, a_in_b, b_in_a)
    assert both == pytest.approx(transfer_similarity(ib, ia, xb, xa, b_in_a, a_in_b), abs=1e-12)
    assert both == pytest.approx(0.5 * (value + decomposition_transfer(ib, xb, xa, b_in_a)))
    # a model against itself: its own atoms are its activations at its labels
    own = activations_at_labels(model_a, toks, [hooks[1]], ia.atom_labels)[hooks[1]]
    assert torch.allclose(torch.nn.functional.normalize(own, dim=1), ia.W_dec, atol=1e-5)
    self_value = decomposition_transfer(ia, xa, xa, own.double())
    assert self_value > value and self_value <= 1
    with pytest.raises(ValueError, match="atoms_in_b must be"):
        decomposition_transfer(ia, xa, xb, a_in_b[:-1])
    with pytest.raises(ValueError, match="same n > 0 tokens"):
        decomposition_transfer(ia, xa, xb[:-1], a_in_b)
    with pytest.raises(ValueError, match="NaN"):
        decomposition_transfer(ia, xa, xb * float("nan"), a_in_b)
    bare = ITDA.from_atoms(torch.randn(4, xa.shape[1]), k=2)
    with pytest.raises(IncompatibleLabels, match="without provenance"):
        decomposition_transfer(bare, xa, xb, a_in_b[:4])


def test_activations_at_labels_gathers_from_a_full_run(model) -> None:
    from itda_lens.activations import activations_at_labels, hook_activations

    toks = make_tokens(12, seed=2)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    labels = torch.tensor([[11, 3], [0, 0], [5, 7], [11, 3], [2, 1]])
    got = activations_at_labels(model, toks, hooks, labels, batch_size=2)
    full = hook_activations(model, toks, hooks, None)
    for h in hooks:
        assert torch.allclose(got[h], full[h][labels[:, 0], labels[:, 1]], atol=1e-5)
    with pytest.raises(ValueError, match="outside the tokens"):
        activations_at_labels(model, toks, hooks, torch.tensor([[12, 0]]))
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        activations_at_labels(model, toks, hooks, torch.tensor([1, 2]))


def test_probe_support_jaccard(two_builds, tokenizer) -> None:
    from itda_lens.activations import hook_activations
    from itda_lens.similarity import probe_support_jaccard

    a, b, hooks = two_builds
    probe = make_tokens(3, seed=9)
    ia, ib = a[hooks[1]], b[hooks[1]]
    xa, xb = (
        hook_activations(make_model(tokenizer, seed=s), probe, hooks, None)[hooks[1]].reshape(
            -1, ia.cfg.d_in
        )
        for s in (0, 1)
    )
    assert probe_support_jaccard(ia, ia, xa, xa) == 1.0
    value = probe_support_jaccard(ia, ib, xa, xb)
    la = ia.atom_labels[ia.encode_sparse(xa).indices].tolist()
    lb = ib.atom_labels[ib.encode_sparse(xb).indices].tolist()
    plain = np.mean(
        [
            len({tuple(p) for p in u} & {tuple(p) for p in v})
            / len({tuple(p) for p in u} | {tuple(p) for p in v})
            for u, v in zip(la, lb, strict=True)
        ]
    )
    assert value == pytest.approx(plain) and 0 <= value < 1


def test_compare_layers_measures_and_refusals(two_builds, tokenizer) -> None:
    from itda_lens.similarity import LAYER_MEASURES, compare_layers, mutual_knn

    a, b, hooks = two_builds
    la, lb = [a[h] for h in hooks], [b[h] for h in hooks]
    model_a, model_b = make_model(tokenizer, seed=0), make_model(tokenizer, seed=1)
    probe, toks = make_tokens(8, seed=9), make_tokens(32)
    args = {"model_a": model_a, "model_b": model_b, "probe_tokens": probe, "n_probe": 64}
    assert torch.equal(compare_layers(la, lb, "jaccard"), similarity_matrix(la, lb))
    for measure in LAYER_MEASURES[1:]:
        m = compare_layers(la, lb, measure, tokens=toks, **args)
        assert m.shape == (2, 2) and bool(torch.isfinite(m).all()), measure
    # a sample measure equals the function on the same probe activations
    from itda_lens.activations import probe_activations

    pa = probe_activations(model_a, probe, hooks, 64)
    pb = probe_activations(model_b, probe, hooks, 64)
    m = compare_layers(la, lb, "mutual-knn", k=5, **args)
    assert float(m[1, 0]) == pytest.approx(mutual_knn(pa[hooks[1]], pb[hooks[0]], 5))
    with pytest.raises(ValueError, match="unknown measure 'cka'"):
        compare_layers(la, lb, "cka")
    with pytest.raises(ValueError, match="give model_a, model_b and probe_tokens"):
        compare_layers(la, lb, "transfer")
    with pytest.raises(ValueError, match="give tokens"):
        compare_layers(la, lb, "transfer", **args)
    with pytest.raises(IncompatibleLabels, match="not the stream"):
        compare_layers(la, lb, "transfer", tokens=make_tokens(32, seed=3), **args)
    with pytest.raises(ValueError, match="fewer than n_tokens"):
        probe_activations(model_a, probe[:1], hooks, 10_000)


def test_support_jaccard_counts_each_atom_once() -> None:
    from itda_lens.similarity import support_jaccard

    a = torch.tensor([[1, 2, 2, 3], [5, 5, 5, 5]])
    b = torch.tensor([[3, 4, 1, 1], [5, 6, 7, 8]])
    # {1,2,3} vs {1,3,4}: 2 / 4; {5} vs {5,6,7,8}: 1 / 4
    assert support_jaccard(a, b) == pytest.approx((0.5 + 0.25) / 2)
    assert support_jaccard(a, a) == 1.0
    with pytest.raises(ValueError, match="same n > 0 tokens"):
        support_jaccard(a, b[:1])


def test_support_labels_anchored_to_text_match_a_plain_transcription() -> None:
    from itda_lens.similarity import support_labels

    torch.manual_seed(0)
    labels = torch.tensor([[0, 1], [0, 2], [1, 1], [1, 2], [0, 3]])
    itda = ITDA.from_atoms(torch.randn(5, 6), k=2, labels=labels)
    spans = torch.tensor(
        [
            [[-1, -1, -1], [4, 0, 3], [4, 3, 5], [4, 5, 9]],
            [[-1, -1, -1], [4, 9, 12], [7, 0, 2], [7, 2, 6]],
        ]
    )
    probe = torch.randn(9, 6)
    got = support_labels(itda, probe, spans=spans)
    idx = itda.encode_sparse(probe).indices
    for row, picked in zip(got.tolist(), idx.tolist(), strict=True):
        want = []
        for atom in picked:
            s, p = labels[atom].tolist()
            doc, _, end = spans[s, p].tolist()
            want.append(doc * 2**32 + end)
        assert row == want
    # without spans: (sequence, position) keys, which two tokenizers never share
    plain = support_labels(itda, probe)
    assert plain.tolist() == [
        [labels[a, 0].item() * 2**32 + labels[a, 1].item() for a in r] for r in idx.tolist()
    ]
    with pytest.raises(IncompatibleLabels, match="beyond the given spans"):
        support_labels(itda, probe, spans=spans[:, :2])
