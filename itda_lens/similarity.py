"""Cross-model similarity: ITDA Jaccard on atom labels, and textbook baselines on raw activations.

ITDA similarity (Leask et al., eq. 8) is the Jaccard index of two dictionaries' atom labels — the
``(sequence, position)`` each atom was read at. Labels only mean the same thing when both builders
read the same token stream, so every ITDA records a fingerprint of its stream (tokenizer, context
size, a hash of its first sequences) in its build record, and comparing incompatible ones
raises :class:`IncompatibleLabels`. Across tokenizers, labels are anchored to the source text instead:
(document, character at which the atom's token ends) — :func:`span_labels`.

Baselines compare activations of the same tokens, accumulated over batches so memory does not grow
with the number of tokens (:class:`PairStats`): linear CKA (Kornblith et al. 2019; centred, no
per-feature scaling), SVCCA (Raghu et al. 2017; each side reduced to the principal directions that
explain 99% of its variance, score = mean canonical correlation), relative representations
(Moschella et al. 2023; cosine similarities to shared anchor tokens, compared by cosine and
averaged) and linear-regression R^2 (Y from X with intercept, variance-weighted). On a shared
sample of tokens: mutual k-nearest neighbours and CKNNA (Huh et al. 2024), debiased CKA (Song et
al. 2012's unbiased HSIC) and orthogonal Procrustes similarity (Ding et al. 2021).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.saes import ITDA


class IncompatibleLabels(ValueError):
    """Two dictionaries' labels index different token streams; their overlap would be meaningless."""


def stream_key(itda: ITDA) -> tuple[object, ...] | None:
    """What must agree for labels to be comparable (context size, first sequences' tokens), from
    the ITDA's build record; None when it records no token stream."""
    record = itda.build_record
    return None if record is None else record.stream.label_key


def check_comparable(a: ITDA, b: ITDA) -> None:
    """Raise :class:`IncompatibleLabels` unless both ITDAs' labels index the same token stream."""
    for side, itda in (("first", a), ("second", b)):
        if stream_key(itda) is None:
            raise IncompatibleLabels(
                f"the {side} ITDA ({itda.cfg.metadata.hook_name or 'no hook'}) records no token "
                "stream: it was built from activations without tokens= or made by "
                "ITDA.from_atoms, so its labels cannot be matched to another dictionary's. "
                "Build it with build_itda, or pass build_itda_from_activations(..., tokens=) the "
                "token ids the activations were read from"
            )
    ra, rb = a.build_record, b.build_record
    assert ra is not None and rb is not None
    ka = (ra.stream.tokenizer, *ra.stream.label_key)  # type: ignore[misc]
    kb = (rb.stream.tokenizer, *rb.stream.label_key)  # type: ignore[misc]
    if None in (ka[0], kb[0]):  # a tokenizer name is compared only when both record one
        ka, kb = (None, *ka[1:]), (None, *kb[1:])
    if ka != kb:
        fields = ("tokenizer", "context_size", "first sequences")
        diff = [f"{f}: {x!r} vs {y!r}" for f, x, y in zip(fields, ka, kb, strict=True) if x != y]
        raise IncompatibleLabels(
            "the two ITDAs were built from different token streams ("
            + "; ".join(diff)
            + "); build both on the same tokens, or compare text spans with span_jaccard"
        )


def label_set(itda: ITDA) -> set[tuple[int, int]]:
    return {(int(s), int(p)) for s, p in itda.atom_labels.tolist()}


def _jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def jaccard(a: ITDA, b: ITDA) -> float:
    """Jaccard index of two ITDAs' atom labels (raises if their token streams differ)."""
    check_comparable(a, b)
    return _jaccard(label_set(a), label_set(b))


def model_jaccard(a: Sequence[ITDA], b: Sequence[ITDA]) -> float:
    """Model-level similarity: Jaccard of the unions of the layers' label sets."""
    for x in (*a, *b):
        check_comparable(a[0], x)
    return _jaccard(set().union(*map(label_set, a)), set().union(*map(label_set, b)))


def similarity_matrix(
    a: Sequence[ITDA], b: Sequence[ITDA], measure: Callable[[ITDA, ITDA], float] = jaccard
) -> Tensor:
    """``measure`` for every pair of layers: [len(a), len(b)]."""
    return torch.tensor([[measure(x, y) for y in b] for x in a])


def span_labels(itda: ITDA, spans: Int[Tensor, "n_seq seq 3"]) -> set[tuple[int, int]]:
    """Atoms anchored to the text: (document id, character where the atom's token ends).

    ``spans`` must be the (document, start, end) of every token of the stream the ITDA was built
    from (``zoo.load_token_spans`` with the same arguments as the tokens); atoms at positions with
    no source text (BOS: document -1) are dropped.
    """
    seq, pos = itda.atom_labels[:, 0], itda.atom_labels[:, 1]
    if seq.numel() and (
        int(seq.max()) >= spans.shape[0] or int(pos.max()) >= spans.shape[1] or int(seq.min()) < 0
    ):
        raise IncompatibleLabels(
            f"atom labels reach beyond the given spans ({tuple(spans.shape[:2])})"
        )
    picked = spans[seq, pos]
    return {(int(d), int(e)) for d, _, e in picked.tolist() if d >= 0}


def span_jaccard(a: ITDA, spans_a: Tensor, b: ITDA, spans_b: Tensor) -> float:
    """Overlap of two dictionaries built on the same documents, possibly with different tokenizers."""
    return _jaccard(span_labels(a, spans_a), span_labels(b, spans_b))


# --- baselines on activations -------------------------------------------------------------------


@dataclass
class PairStats:
    """Running first and second moments of paired activations X [N, dx], Y [N, dy] (float64), plus
    relative-representation agreement against fixed anchors: enough for every baseline measure."""

    anchors_x: Float[Tensor, "a dx"] | None = None
    anchors_y: Float[Tensor, "a dy"] | None = None
    n: int = 0
    sx: Tensor | None = None
    sy: Tensor | None = None
    sxx: Tensor | None = None
    syy: Tensor | None = None
    sxy: Tensor | None = None
    rel_sum: float = 0.0

    def update(self, x: Float[Tensor, "b dx"], y: Float[Tensor, "b dy"]) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"paired activations need the same number of rows, got {x.shape[0]} and {y.shape[0]}"
            )
        x, y = x.double(), y.double()
        if self.sx is None:
            self.sx, self.sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
            self.sxx, self.syy = (
                x.new_zeros(x.shape[1], x.shape[1]),
                y.new_zeros(y.shape[1], y.shape[1]),
            )
            self.sxy = x.new_zeros(x.shape[1], y.shape[1])
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y
        if self.anchors_x is not None and self.anchors_y is not None:
            self.rel_sum += float(relative_agreement(x, y, self.anchors_x, self.anchors_y).sum())

    def _cov(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.n < 2 or self.sx is None:
            raise ValueError("need at least two paired activations")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx / self.n - torch.outer(mx, mx)
        cyy = self.syy / self.n - torch.outer(my, my)
        cxy = self.sxy / self.n - torch.outer(mx, my)
        return cxx, cyy, cxy

    def linear_cka(self) -> float:
        cxx, cyy, cxy = self._cov()
        return float((cxy**2).sum() / (torch.linalg.norm(cxx) * torch.linalg.norm(cyy)))

    def svcca(self, variance: float = 0.99) -> float:
        cxx, cyy, cxy = self._cov()
        px, lx = _principal(cxx, variance)
        py, ly = _principal(cyy, variance)
        whitened = (px / lx.sqrt()).T @ cxy @ (py / ly.sqrt())
        corr = torch.linalg.svdvals(whitened).clamp(max=1.0)
        return float(corr.mean())

    def linreg_r2(self, reverse: bool = False) -> float:
        """R^2 of the least-squares prediction of Y from X (of X from Y if ``reverse``)."""
        cxx, cyy, cxy = self._cov()
        if reverse:
            cxx, cyy, cxy = cyy, cxx, cxy.T
        explained = torch.trace(cxy.T @ torch.linalg.pinv(cxx, hermitian=True) @ cxy)
        return float(explained / torch.trace(cyy))

    def relative(self) -> float:
        if self.anchors_x is None:
            raise ValueError(
                "relative similarity needs anchors: PairStats(anchors_x=..., anchors_y=...)"
            )
        return self.rel_sum / self.n


def _principal(cov: Tensor, variance: float) -> tuple[Tensor, Tensor]:
    """Eigenvectors of ``cov`` (columns) explaining ``variance`` of the total, and their eigenvalues."""
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    keep = int((torch.cumsum(vals, 0) / vals.sum() < variance).sum()) + 1
    keep = min(keep, int((vals > vals[0] * 1e-12).sum()))
    return vecs[:, :keep], vals[:keep]


def relative_agreement(x: Tensor, y: Tensor, anchors_x: Tensor, anchors_y: Tensor) -> Tensor:
    """Per token: cosine between its relative representations (cosines to the anchors) in X and Y."""
    unit = torch.nn.functional.normalize
    rx = unit(x, dim=1) @ unit(anchors_x.to(x.dtype), dim=1).T
    ry = unit(y, dim=1) @ unit(anchors_y.to(y.dtype), dim=1).T
    return torch.nn.functional.cosine_similarity(rx, ry, dim=1)


# --- baselines on a shared sample of tokens --------------------------------------------------
#
# These need the activations of the same n tokens under both models at once (n x n kernels), so
# they run on a sample (a few thousand tokens), not on a stream.


def _paired(x: Tensor, y: Tensor, at_least: int) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            "paired activations must be [n, dx] and [n, dy] over the same n tokens, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < at_least:
        raise ValueError(f"need at least {at_least} paired tokens, got {x.shape[0]}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("paired activations contain NaN or Inf")
    return x.double(), y.double()


def _check_k(k: int, n: int) -> None:
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} tokens, got {k}")


def knn_mask(x: Float[Tensor, "n d"], k: int) -> Float[Tensor, "n n"]:
    """Row i marks the ``k`` rows most similar to row i by inner product (itself excluded; ties
    go to the lower index)."""
    sim = x @ x.T
    sim.fill_diagonal_(-torch.inf)
    idx = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(sim).scatter_(1, idx, 1.0)


def mutual_knn(x: Float[Tensor, "n dx"], y: Float[Tensor, "n dy"], k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "the platonic representation"): the
    mean over tokens of the fraction of a token's k nearest neighbours (cosine, among the sample)
    that are the same under both models."""
    x, y = _paired(x, y, 2)
    _check_k(k, x.shape[0])
    unit = torch.nn.functional.normalize
    both = knn_mask(unit(x, dim=1), k) * knn_mask(unit(y, dim=1), k)
    return float(both.sum(dim=1).mean() / k)


def hsic_unbiased(K: Float[Tensor, "n n"], L: Float[Tensor, "n n"]) -> Tensor:
    """Song et al. 2012's unbiased HSIC estimator (their eq. 5) of two kernel matrices (n >= 4)."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    Kt, Lt = K.clone(), L.clone()
    Kt.fill_diagonal_(0)
    Lt.fill_diagonal_(0)
    value = (
        (Kt * Lt.T).sum()
        + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2))
        - 2 * (Kt.sum(0) @ Lt.sum(1)) / (m - 2)
    )
    return value / (m * (m - 3))


def _cka(K: Tensor, L: Tensor) -> float:
    kl, kk, ll = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
    if float(kk) <= 0 or float(ll) <= 0:
        raise ValueError("a side has no variance across the sample (constant activations?)")
    return float(kl / torch.sqrt(kk * ll))


def debiased_cka(x: Float[Tensor, "n dx"], y: Float[Tensor, "n dy"]) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021):
    no bias toward 1 from a small sample or wide features, unlike the plug-in estimate."""
    x, y = _paired(x, y, 4)
    return _cka(x @ x.T, y @ y.T)


def cknna(x: Float[Tensor, "n dx"], y: Float[Tensor, "n dy"], k: int = 10) -> float:
    """Centred kernel nearest-neighbour alignment (Huh et al. 2024): debiased CKA of the cosine
    kernels restricted to the token pairs that are k-nearest neighbours under both models (each
    side's self-similarity restricted to its own neighbours). With ``k = n - 1`` it is the
    debiased CKA of the cosine kernels."""
    x, y = _paired(x, y, 4)
    _check_k(k, x.shape[0])
    unit = torch.nn.functional.normalize
    ux, uy = unit(x, dim=1), unit(y, dim=1)
    K, L = ux @ ux.T, uy @ uy.T
    mk, ml = knn_mask(ux, k), knn_mask(uy, k)
    kl = hsic_unbiased(mk * ml * K, mk * ml * L)
    kk, ll = hsic_unbiased(mk * K, mk * K), hsic_unbiased(ml * L, ml * L)
    if float(kk) <= 0 or float(ll) <= 0:
        raise ValueError("a side has no variance among its neighbours (constant activations?)")
    return float(kl / torch.sqrt(kk * ll))


def procrustes_similarity(x: Float[Tensor, "n dx"], y: Float[Tensor, "n dy"]) -> float:
    """Orthogonal Procrustes similarity (Ding et al. 2021): with both sides centred and scaled to
    unit Frobenius norm, the nuclear norm of X^T Y, i.e. 1 - d^2 / 2 for the Procrustes distance d
    after the best rotation of one side onto the other (1: equal up to rotation and scale)."""
    x, y = _paired(x, y, 2)
    x, y = x - x.mean(0), y - y.mean(0)
    nx, ny = torch.linalg.norm(x), torch.linalg.norm(y)
    if float(nx) == 0 or float(ny) == 0:
        raise ValueError("a side has no variance across the sample (constant activations?)")
    return float(torch.linalg.svdvals((x / nx).T @ (y / ny)).sum())


def layer_matching_accuracy(
    matrices: Mapping[tuple[str, str], Tensor], include_self: bool = False
) -> float:
    """Kornblith et al.'s test: over ordered model pairs of equal depth and every layer i of the
    first, how often the most similar layer of the second is layer i. Self-pairs (a model against
    itself, trivially right for any measure) are excluded unless ``include_self``."""
    hits = total = 0
    for (a, b), m in matrices.items():
        if (a == b and not include_self) or m.shape[0] != m.shape[1]:
            continue
        hits += int((m.argmax(dim=1) == torch.arange(m.shape[0])).sum())
        total += m.shape[0]
    if total == 0:
        raise ValueError("no pair of equal-depth models to score")
    return hits / total
