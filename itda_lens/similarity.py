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

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.activations import activations_at_labels, check_labels, probe_activations
from itda_lens.builder.stream import prefix_digest
from itda_lens.pursuit import SparseCode
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


def set_jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def jaccard(a: ITDA, b: ITDA) -> float:
    """Jaccard index of two ITDAs' atom labels (raises if their token streams differ)."""
    check_comparable(a, b)
    return set_jaccard(label_set(a), label_set(b))


def model_jaccard(a: Sequence[ITDA], b: Sequence[ITDA]) -> float:
    """Model-level similarity: Jaccard of the unions of the layers' label sets."""
    for x in (*a, *b):
        check_comparable(a[0], x)
    return set_jaccard(set().union(*map(label_set, a)), set().union(*map(label_set, b)))


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
    return set_jaccard(span_labels(a, spans_a), span_labels(b, spans_b))


def _span_keys(spans: Int[Tensor, "n_seq seq 3"]) -> tuple[Tensor, Tensor]:
    """(document, end) of every token with source text as one int each, and its flat position."""
    flat = spans.reshape(-1, 3).long()
    where = (flat[:, 0] >= 0).nonzero().flatten()
    return flat[where, 0] * 2**32 + flat[where, 2], where


def aligned_positions(
    spans_a: Int[Tensor, "na_seq seq_a 3"], spans_b: Int[Tensor, "nb_seq seq_b 3"]
) -> tuple[Int[Tensor, "m 2"], Int[Tensor, "m 2"]]:
    """Tokens of two streams (e.g. two tokenizers over the same documents) that end at the same
    character of the same document: their (sequence, position) in A and in B, in A's order (the
    first occurrence of each text point in each stream), so both models are read after exactly
    the same text."""
    ka, wa = _span_keys(spans_a)
    kb, wb = _span_keys(spans_b)
    kb, first = _first_of_each(kb)
    wb = wb[first]
    order = kb.argsort()
    at = torch.searchsorted(kb[order], ka).clamp(max=max(len(kb) - 1, 0))
    hit = (kb[order][at] == ka) if len(kb) else torch.zeros_like(ka, dtype=torch.bool)
    _, first_a = _first_of_each(ka[hit])
    pa, pb = wa[hit][first_a], wb[order][at[hit]][first_a]
    return (
        torch.stack([pa // spans_a.shape[1], pa % spans_a.shape[1]], 1),
        torch.stack([pb // spans_b.shape[1], pb % spans_b.shape[1]], 1),
    )


def _first_of_each(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the first occurrence of each distinct value of ``keys``, in their order."""
    _, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if len(keys) else 0,), len(keys), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(keys)), "amin").sort().values
    return keys[first], first


def labels_by_span(
    labels: Int[Tensor, "n 2"],
    spans_from: Int[Tensor, "na_seq seq_a 3"],
    spans_to: Int[Tensor, "nb_seq seq_b 3"],
) -> Int[Tensor, "n 2"]:
    """Carries (sequence, position) labels of one stream to another over the same documents: the
    token of the other stream whose text covers the last character of the labelled token (the
    first token after which a causal model has read it). Raises if a label has no source text or
    the other stream does not cover it."""
    check_labels(labels, spans_from.shape[:2], "the spans")
    src = spans_from[labels[:, 0], labels[:, 1]].long()
    if bool((src[:, 0] < 0).any()):
        raise IncompatibleLabels("a label points at a token with no source text (BOS)")
    keys_to, where = _span_keys(spans_to)
    keys_to, first = _first_of_each(keys_to)
    where = where[first]
    order = keys_to.argsort()
    want = src[:, 0] * 2**32 + src[:, 2]
    at = torch.searchsorted(keys_to[order], want)  # the first token ending at or after the char
    ok = at < len(keys_to)
    pick = where[order][at.clamp(max=max(len(keys_to) - 1, 0))]
    flat = spans_to.reshape(-1, 3).long()
    got = flat[pick] if len(keys_to) else torch.zeros(len(want), 3, dtype=torch.long)
    ok &= (got[:, 0] == src[:, 0]) & (got[:, 1] < src[:, 2])
    if not bool(ok.all()):
        missing = src[~ok][0].tolist()
        raise IncompatibleLabels(
            f"the other stream does not cover the text of every label (first missing: document "
            f"{missing[0]}, characters {missing[1]}-{missing[2]}): build it over the same documents"
        )
    return torch.stack([pick // spans_to.shape[1], pick % spans_to.shape[1]], 1)


# --- ITDA measures on a probe sample -----------------------------------------------------------
#
# Label Jaccard needs the two dictionaries to pick the same tokens, which the greedy rule does only
# partly even for one model read in another order. These measures use each atom's provenance
# differently: an ITDA code says "this token is a combination of those stream tokens", and whether
# that still holds in another model can be checked with that model's activations of the same tokens.


def _provenance(itda: ITDA) -> Int[Tensor, "n_atoms 2"]:
    labels = itda.atom_labels
    if labels.numel() and int(labels.min()) < 0:
        raise IncompatibleLabels(
            f"the ITDA ({itda.cfg.metadata.hook_name or 'no hook'}) has atoms without provenance "
            "(label -1): decomposition transfer needs every atom's (sequence, position)"
        )
    return labels


def decomposition_transfer(
    a: ITDA,
    probe_a: Float[Tensor, "n da"],
    probe_b: Float[Tensor, "n db"],
    atoms_in_b: Float[Tensor, "n_atoms db"],
    k: int | None = None,
    code: SparseCode | None = None,
) -> float:
    """How well A's ITDA decompositions carry over to model B, one direction.

    Each probe token is encoded by A's dictionary: k atoms, each a token of the build stream, with
    coefficients. B's activations of those same tokens (``atoms_in_b``: B at ``a.atom_labels``,
    e.g. from :func:`~itda_lens.activations.activations_at_labels`), scaled to unit norm as atoms
    are, are combined with the same coefficients and compared by cosine with B's activation of the
    probe token, after removing B's mean probe activation from both (from the unit atoms at their
    scale: the mean divided by the mean norm); the mean over probe tokens. It needs no shared atoms,
    only a shared token stream; 1 means A's decompositions hold exactly in B. ``code``: A's codes
    of ``probe_a`` when already computed (``a.encode_sparse(probe_a, k)``).
    """
    _provenance(a)
    pa = _finite_2d(probe_a, "probe activations of A")
    pb = _finite_2d(probe_b, "probe activations of B")
    ab = _finite_2d(atoms_in_b, "B's activations at A's atoms")
    if pa.shape[0] != pb.shape[0] or pa.shape[0] == 0:
        raise ValueError(
            f"probe activations must cover the same n > 0 tokens, got {pa.shape[0]} and {pb.shape[0]}"
        )
    if ab.shape != (a.cfg.d_sae, pb.shape[1]):
        raise ValueError(
            f"atoms_in_b must be [{a.cfg.d_sae}, {pb.shape[1]}] (B's activation at each of A's "
            f"{a.cfg.d_sae} atom labels), got {tuple(ab.shape)}"
        )
    if code is None:
        code = a.encode_sparse(pa.to(a.W_dec.dtype), k)
    elif code.indices.shape[0] != pa.shape[0]:
        raise ValueError(f"code covers {code.indices.shape[0]} tokens, the probe {pa.shape[0]}")
    mean = pb.mean(0)
    units = torch.nn.functional.normalize(ab, dim=1) - mean / pb.norm(dim=1).mean()
    guess = (code.values.double().unsqueeze(-1) * units[code.indices]).sum(1)
    return float(torch.nn.functional.cosine_similarity(guess, pb - mean, dim=1).mean())


def transfer_similarity(
    a: ITDA,
    b: ITDA,
    probe_a: Float[Tensor, "n da"],
    probe_b: Float[Tensor, "n db"],
    a_atoms_in_b: Float[Tensor, "n_a db"],
    b_atoms_in_a: Float[Tensor, "n_b da"],
    k: int | None = None,
    codes: tuple[SparseCode | None, SparseCode | None] = (None, None),
) -> float:
    """ITDA transfer similarity: :func:`decomposition_transfer` both ways, averaged (symmetric).
    The two dictionaries must label the same token stream; ``codes``: A's and B's codes of their
    probes when already computed."""
    check_comparable(a, b)
    return 0.5 * (
        decomposition_transfer(a, probe_a, probe_b, a_atoms_in_b, k, codes[0])
        + decomposition_transfer(b, probe_b, probe_a, b_atoms_in_a, k, codes[1])
    )


def support_labels(
    itda: ITDA,
    probe: Float[Tensor, "n d"],
    k: int | None = None,
    spans: Int[Tensor, "n_seq seq 3"] | None = None,
) -> Int[Tensor, "n k"]:
    """Each probe token's support under ``itda`` as atom labels (one int per (sequence,
    position)), for :func:`support_jaccard`; with ``spans`` (of the build stream, as for
    :func:`span_labels`) anchored to the text instead, one int per (document, end character), so
    supports compare across tokenizers."""
    labels = _provenance(itda)
    code = itda.encode_sparse(_finite_2d(probe, "probe activations").to(itda.W_dec.dtype), k)
    picked = labels[code.indices]
    if spans is None:
        return picked[..., 0] * 2**32 + picked[..., 1]
    if labels.numel() and (
        int(labels[:, 0].max()) >= spans.shape[0] or int(labels[:, 1].max()) >= spans.shape[1]
    ):
        raise IncompatibleLabels(
            f"atom labels reach beyond the given spans ({tuple(spans.shape[:2])})"
        )
    text = spans[picked[..., 0], picked[..., 1]].long()
    return text[..., 0] * 2**32 + text[..., 2]


def _distinct(keys: Tensor) -> Tensor:
    """Marks each row's first occurrence of every value (MP may pick an atom twice)."""
    ordered, order = keys.sort(dim=1)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.zeros_like(first).scatter_(1, order, first)


def support_jaccard(sa: Int[Tensor, "n ka"], sb: Int[Tensor, "n kb"]) -> float:
    """Mean over tokens of the Jaccard index of two supports (:func:`support_labels`)."""
    if sa.shape[0] != sb.shape[0] or sa.shape[0] == 0:
        raise ValueError("probe activations must cover the same n > 0 tokens")
    da, db = _distinct(sa), _distinct(sb)
    both = ((sa.unsqueeze(2) == sb.unsqueeze(1)).any(2) & da).sum(1)
    union = da.sum(1) + db.sum(1) - both
    return float((both / union).mean())


def probe_support_jaccard(
    a: ITDA,
    b: ITDA,
    probe_a: Float[Tensor, "n da"],
    probe_b: Float[Tensor, "n db"],
    k: int | None = None,
) -> float:
    """Mean over probe tokens of the Jaccard index of the atom labels in their supports under A's
    and under B's dictionary (weights each atom by how often it is used, unlike label Jaccard)."""
    check_comparable(a, b)
    return support_jaccard(support_labels(a, probe_a, k), support_labels(b, probe_b, k))


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


def relative_representation(x: Float[Tensor, "n d"], anchors: Float[Tensor, "a d"]) -> Tensor:
    """Each token's cosines to the anchor tokens [n, a] (Moschella et al. 2023)."""
    unit = torch.nn.functional.normalize
    return unit(x, dim=1) @ unit(anchors.to(x.dtype), dim=1).T


def relative_agreement(x: Tensor, y: Tensor, anchors_x: Tensor, anchors_y: Tensor) -> Tensor:
    """Per token: cosine between its relative representations (cosines to the anchors) in X and Y."""
    return torch.nn.functional.cosine_similarity(
        relative_representation(x, anchors_x), relative_representation(y, anchors_y), dim=1
    )


# --- baselines on a shared sample of tokens --------------------------------------------------
#
# These need the activations of the same n tokens under both models at once (n x n kernels), so
# they run on a sample (a few thousand tokens), not on a stream.


def _finite_2d(x: Tensor, what: str = "activations") -> Tensor:
    if x.ndim != 2:
        raise ValueError(f"{what} must be [n, d], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or Inf")
    return x.double()


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


class SampleView:
    """One model's activations of a token sample, prepared once for many pairings: each sample
    measure accepts a view or a raw ``[n, d]`` tensor, and a view keeps what does not depend on
    the other side (unit rows, the kNN mask per k, self-HSICs), so an L x L layer grid costs L
    sorts instead of L^2."""

    def __init__(self, x: Float[Tensor, "n d"]):
        self.x = _finite_2d(x, "paired activations")
        self.unit = torch.nn.functional.normalize(self.x, dim=1)
        self._masks: dict[int, Tensor] = {}
        self._cache: dict[object, Tensor] = {}

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def mask(self, k: int) -> Float[Tensor, "n n"]:
        """:func:`knn_mask` of the unit rows (cosine neighbours)."""
        _check_k(k, self.n)
        if k not in self._masks:
            self._masks[k] = knn_mask(self.unit, k)
        return self._masks[k]

    def cosine_kernel(self) -> Float[Tensor, "n n"]:
        """unit @ unit.T, kept (n^2 doubles: 32 MB at n = 2,048)."""
        return self.cached("cosine kernel", lambda: self.unit @ self.unit.T)

    def cached(self, key: object, make: Callable[[], Tensor]) -> Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _views(
    x: Tensor | SampleView, y: Tensor | SampleView, at_least: int
) -> tuple[SampleView, SampleView]:
    vx = x if isinstance(x, SampleView) else SampleView(x)
    vy = y if isinstance(y, SampleView) else SampleView(y)
    if vx.n != vy.n:
        raise ValueError(
            "paired activations must be [n, dx] and [n, dy] over the same n tokens, got "
            f"{tuple(vx.x.shape)} and {tuple(vy.x.shape)}"
        )
    if vx.n < at_least:
        raise ValueError(f"need at least {at_least} paired tokens, got {vx.n}")
    return vx, vy


Sample = Float[Tensor, "n d"] | SampleView


def mutual_knn(x: Sample, y: Sample, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "the platonic representation"): the
    mean over tokens of the fraction of a token's k nearest neighbours (cosine, among the sample)
    that are the same under both models."""
    vx, vy = _views(x, y, 2)
    both = vx.mask(k) * vy.mask(k)
    return float(both.sum(dim=1).mean() / k)


def hsic_unbiased(K: Float[Tensor, "n n"], L: Float[Tensor, "n n"]) -> Tensor:
    """Song et al. 2012's unbiased HSIC estimator (their eq. 5) of two kernel matrices (n >= 4)."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    # the estimator is over K~, L~ (diagonals zeroed); their sums are taken from K and L minus
    # the diagonals, without copying the n x n matrices
    dk, dl = K.diagonal(), L.diagonal()
    value = (
        ((K * L.T).sum() - dk @ dl)
        + (K.sum() - dk.sum()) * (L.sum() - dl.sum()) / ((m - 1) * (m - 2))
        - 2 * ((K.sum(0) - dk) @ (L.sum(1) - dl)) / (m - 2)
    )
    return value / (m * (m - 3))


def _ratio(kl: Tensor, kk: Tensor, ll: Tensor, what: str) -> float:
    if float(kk) <= 0 or float(ll) <= 0:
        raise ValueError(f"a side has no variance {what} (constant activations?)")
    return float(kl / torch.sqrt(kk * ll))


def debiased_cka(x: Sample, y: Sample) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021):
    no bias toward 1 from a small sample or wide features, unlike the plug-in estimate."""
    vx, vy = _views(x, y, 4)
    K, L = vx.x @ vx.x.T, vy.x @ vy.x.T
    kk = vx.cached("hsic linear", lambda: hsic_unbiased(K, K))
    ll = vy.cached("hsic linear", lambda: hsic_unbiased(L, L))
    return _ratio(hsic_unbiased(K, L), kk, ll, "across the sample")


def cknna(x: Sample, y: Sample, k: int = 10) -> float:
    """Centred kernel nearest-neighbour alignment (Huh et al. 2024): debiased CKA of the cosine
    kernels restricted to the token pairs that are k-nearest neighbours under both models (each
    side's self-similarity restricted to its own neighbours). With ``k = n - 1`` it is the
    debiased CKA of the cosine kernels."""
    vx, vy = _views(x, y, 4)
    K, L = vx.cosine_kernel(), vy.cosine_kernel()
    mk, ml = vx.mask(k), vy.mask(k)
    kk = vx.cached(("hsic knn", k), lambda: hsic_unbiased(mk * K, mk * K))
    ll = vy.cached(("hsic knn", k), lambda: hsic_unbiased(ml * L, ml * L))
    both = mk * ml
    return _ratio(hsic_unbiased(both * K, both * L), kk, ll, "among its neighbours")


def procrustes_similarity(x: Sample, y: Sample) -> float:
    """Orthogonal Procrustes similarity (Ding et al. 2021): with both sides centred and scaled to
    unit Frobenius norm, the nuclear norm of X^T Y, i.e. 1 - d^2 / 2 for the Procrustes distance d
    after the best rotation of one side onto the other (1: equal up to rotation and scale)."""
    vx, vy = _views(x, y, 2)

    def scaled(v: SampleView) -> Tensor:
        c = v.x - v.x.mean(0)
        norm = torch.linalg.norm(c)
        if float(norm) == 0:
            raise ValueError("a side has no variance across the sample (constant activations?)")
        return c / norm

    sx, sy = (
        vx.cached("procrustes", lambda: scaled(vx)),
        vy.cached("procrustes", lambda: scaled(vy)),
    )
    return float(torch.linalg.svdvals(sx.T @ sy).sum())


#: what :func:`compare_layers` (and ``itda-lens similarity --measure``) computes: label Jaccard,
#: the two ITDA probe measures, and the sample baselines
LayerMeasure = Literal[
    "jaccard", "transfer", "support", "mutual-knn", "cknna", "debiased-cka", "procrustes"
]  # fmt: skip
LAYER_MEASURES: tuple[str, ...] = get_args(LayerMeasure)


def _hooks(itdas: Sequence[ITDA], side: str) -> list[str]:
    hooks = [x.cfg.metadata.hook_name for x in itdas]
    if any(h is None for h in hooks):
        raise ValueError(f"an ITDA of {side} records no hook_name: cannot read its activations")
    return [str(h) for h in hooks]


def _check_stream(itdas: Sequence[ITDA], tokens: Tensor) -> None:
    digest = prefix_digest(tokens)
    for x in itdas:
        record = x.build_record
        if record is None or record.stream.prefix_sha256 != digest:
            raise IncompatibleLabels(
                f"tokens are not the stream the ITDA at {x.cfg.metadata.hook_name} was built on "
                "(its first sequences differ): pass the build's own tokens"
            )


def compare_layers(
    a: Sequence[ITDA],
    b: Sequence[ITDA],
    measure: LayerMeasure = "transfer",
    *,
    model_a: Any = None,
    model_b: Any = None,
    tokens: Int[Tensor, "n_seq seq"] | None = None,
    probe_tokens: Int[Tensor, "m_seq seq"] | None = None,
    n_probe: int = 2048,
    k: int = 10,
    seed: int = 7,
) -> Float[Tensor, "la lb"]:
    """Similarity of every layer of A with every layer of B ([len(a), len(b)]) by ``measure``
    (one of :data:`LAYER_MEASURES`). ``"jaccard"`` needs only the dictionaries; the others read
    both models (``model_a``, ``model_b``) at ``n_probe`` tokens of ``probe_tokens``
    (:func:`~itda_lens.activations.probe_activations`); ``"transfer"`` also reads them at the
    atoms' tokens, so it needs ``tokens``, the stream both dictionaries were built on. ``k`` is
    the neighbour count of mutual-knn and cknna. The measure to use for layer matching is
    ``"transfer"`` among the ITDA ones (see the README's model comparison section)."""
    if measure not in LAYER_MEASURES:
        raise ValueError(f"unknown measure {measure!r}; one of {', '.join(LAYER_MEASURES)}")
    if measure == "jaccard":
        return similarity_matrix(a, b, jaccard)
    if model_a is None or model_b is None or probe_tokens is None:
        raise ValueError(
            f"measure {measure!r} reads activations: give model_a, model_b and probe_tokens"
        )
    ha, hb = _hooks(a, "A"), _hooks(b, "B")
    pa = probe_activations(model_a, probe_tokens, ha, n_probe, seed)
    pb = probe_activations(model_b, probe_tokens, hb, n_probe, seed)
    xa, xb = [pa[h].double() for h in ha], [pb[h].double() for h in hb]
    out = torch.zeros(len(a), len(b))
    if measure == "transfer":
        if tokens is None:
            raise ValueError(
                "transfer reads both models at the atoms' tokens: give tokens, the stream the "
                "dictionaries were built on"
            )
        _check_stream([*a, *b], tokens)
        a_in_b = [activations_at_labels(model_b, tokens, hb, x.atom_labels) for x in a]
        b_in_a = [activations_at_labels(model_a, tokens, ha, y.atom_labels) for y in b]
        ca = [x.encode_sparse(p.to(x.W_dec.dtype)) for x, p in zip(a, xa, strict=True)]
        cb = [y.encode_sparse(p.to(y.W_dec.dtype)) for y, p in zip(b, xb, strict=True)]
        for i, j in itertools.product(range(len(a)), range(len(b))):
            out[i, j] = transfer_similarity(
                a[i], b[j], xa[i], xb[j], a_in_b[i][hb[j]], b_in_a[j][ha[i]],
                codes=(ca[i], cb[j]),
            )  # fmt: skip
        return out
    if measure == "support":
        sa = [support_labels(x, p) for x, p in zip(a, xa, strict=True)]
        sb = [support_labels(y, p) for y, p in zip(b, xb, strict=True)]
        for i, j in itertools.product(range(len(a)), range(len(b))):
            check_comparable(a[i], b[j])
            out[i, j] = support_jaccard(sa[i], sb[j])
        return out
    va, vb = [SampleView(x) for x in xa], [SampleView(y) for y in xb]
    sample_measures: dict[str, Callable[[SampleView, SampleView], float]] = {
        "mutual-knn": lambda x, y: mutual_knn(x, y, k),
        "cknna": lambda x, y: cknna(x, y, k),
        "debiased-cka": debiased_cka,
        "procrustes": procrustes_similarity,
    }
    f = sample_measures[measure]
    for i, j in itertools.product(range(len(a)), range(len(b))):
        out[i, j] = f(va[i], vb[j])
    return out


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
