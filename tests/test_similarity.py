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
    jaccard,
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
