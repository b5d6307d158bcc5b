"""Fitting the cluster SAEs (:mod:`itda_lens.saes.cluster`): k-means++ seeding on a sample,
then exact Lloyd passes (``lloyd``, checked against scikit-learn), then per-cluster covariances
for the local PCA. Everything streams over the activations in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from itda_lens.activations import (
    ActivationSummary,
    CachedActivations,
    set_metadata,
    summarise_activations,
)
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig, LocalPCASAE, LocalPCASAEConfig
from itda_lens.training import default_width

CHUNK = 8192


# --- the maths -----------------------------------------------------------------------------


def nearest(
    x: Float[Tensor, "n d"], centroids: Float[Tensor, "c d"]
) -> tuple[Int[Tensor, " n"], Float[Tensor, " n"]]:
    """Index of and squared distance to the nearest centroid (ties to the lowest index)."""
    c_sq = (centroids * centroids).sum(1)
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + c_sq
    best, idx = d2.min(1)
    return idx, best.clamp_min(0)


def assign_nearest(
    acts: Float[Tensor, "n d"], centroids: Float[Tensor, "c d"], chunk_size: int = CHUNK
) -> Int[Tensor, " n"]:
    """``nearest`` over ``acts`` in chunks (indices only)."""
    return torch.cat(
        [
            nearest(acts[s : s + chunk_size], centroids)[0]
            for s in range(0, acts.shape[0], chunk_size)
        ]
    )


def kmeans_plus_plus(
    x: Float[Tensor, "n d"], n_clusters: int, *, seed: int = 0
) -> Float[Tensor, "c d"]:
    """k-means++ seeding (D² sampling) on ``x``."""
    if n_clusters > x.shape[0]:
        raise ValueError(f"cannot seed {n_clusters} clusters from {x.shape[0]} points")
    g = torch.Generator().manual_seed(seed)
    xd = x.double()
    chosen = [int(torch.randint(x.shape[0], (1,), generator=g))]
    d2 = ((xd - xd[chosen[0]]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: pick any unused point
            unused = torch.ones(x.shape[0], dtype=torch.bool)
            unused[chosen] = False
            pick = int(unused.nonzero()[0])
        else:
            pick = int(torch.multinomial((d2 / total).float().cpu(), 1, generator=g))
        chosen.append(pick)
        d2 = torch.minimum(d2, ((xd - xd[pick]) ** 2).sum(1))
    return x[chosen].clone()


def lloyd(
    acts: Float[Tensor, "n d"],
    init: Float[Tensor, "c d"],
    *,
    max_iter: int = 20,
    tol: float = 1e-4,
    chunk_size: int = CHUNK,
    progress: bool = False,
    summary: ActivationSummary | None = None,
) -> tuple[Float[Tensor, "c d"], float]:
    """Exact Lloyd iterations streamed over ``acts`` in chunks; returns (centroids, inertia).

    Distances are computed in the activations' dtype, sums accumulated in float64.
    Stops when no centroid moves by more than ``tol`` times the mean per-feature variance (as
    scikit-learn does). Empty clusters are re-seeded as scikit-learn does: each at a different
    one of the points farthest from their centroids (``_relocate_empty_clusters``).
    ``summary``: ``summarise_activations(acts)`` if the caller already has it (saves a pass).
    """
    summary = summary or summarise_activations(acts, chunk_size)
    var = float(summary.variance.mean())
    centroids = init.to(acts.device, torch.float64).clone()
    n, c = acts.shape[0], centroids.shape[0]
    for _ in tqdm(range(max_iter), desc="k-means", disable=not progress):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(c, dtype=torch.float64, device=acts.device)
        far = _Farthest.start(c, acts.device)
        for start in range(0, n, chunk_size):
            x = acts[start : start + chunk_size]
            idx, d2 = nearest(x, centroids.to(x.dtype))  # distances in the input's dtype
            sums.index_add_(0, idx, x.double())
            counts.index_add_(0, idx, torch.ones_like(d2, dtype=torch.float64))
            far = far.merge(d2.double(), start + torch.arange(len(d2), device=acts.device), idx)
        far.relocate_empty(acts, sums, counts)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol * var:
            break
    inertia = sum(  # of the returned centroids
        float(nearest(acts[s : s + chunk_size], centroids.to(acts.dtype))[1].double().sum())
        for s in range(0, n, chunk_size)
    )
    return centroids.to(acts.dtype), inertia


@dataclass
class _Farthest:
    """The ``size`` points farthest from their centroids in one Lloyd pass, farthest first:
    enough to re-seed every empty cluster (at most ``c − 1`` are empty) without a second pass."""

    d2: Float[Tensor, " m"]
    point: Int[Tensor, " m"]
    label: Int[Tensor, " m"]
    size: int

    @classmethod
    def start(cls, size: int, device: torch.device) -> _Farthest:
        """No points seen yet."""
        none = torch.empty(0, dtype=torch.long, device=device)
        return cls(torch.empty(0, dtype=torch.float64, device=device), none, none, size)

    def merge(
        self, d2: Float[Tensor, " n"], point: Int[Tensor, " n"], label: Int[Tensor, " n"]
    ) -> _Farthest:
        """Keep the farthest of these and the new points (a chunk's distances and labels)."""
        d2, point, label = (
            torch.cat(p) for p in ((self.d2, d2), (self.point, point), (self.label, label))
        )
        keep = d2.topk(min(self.size, len(d2))).indices  # sorted, largest first
        return _Farthest(d2[keep], point[keep], label[keep], self.size)

    def relocate_empty(
        self,
        acts: Float[Tensor, "n d"],
        sums: Float[Tensor, "c d"],
        counts: Float[Tensor, " c"],
    ) -> None:
        """Move the i-th farthest point out of its cluster into the i-th empty one: ``sums`` and
        ``counts`` in place, as scikit-learn does (nothing to do when every point sits on its
        centroid). A cluster this leaves empty keeps its centroid (scikit-learn's takes the
        largest cluster's mean, a duplicate)."""
        empty = (counts == 0).nonzero().flatten()[: len(self.d2)]
        if len(empty) == 0 or float(self.d2[0]) == 0:
            return
        point, label = self.point[: len(empty)], self.label[: len(empty)]
        x = acts[point].double()
        sums.index_add_(0, label, -x)
        counts.index_add_(0, label, -torch.ones_like(x[:, 0]))
        sums[empty], counts[empty] = x, 1.0


def local_pca(
    acts: Float[Tensor, "n d"],
    assign: Int[Tensor, " n"],
    n_clusters: int,
    n_components: int,
    *,
    chunk_size: int = CHUNK,
) -> tuple[Float[Tensor, "c d"], Float[Tensor, "c m d"]]:
    """Per-cluster mean and top-``n_components`` principal directions (rows, unit norm) from
    streamed per-cluster sums and second moments. Clusters with fewer points get zero rows."""
    n, d = acts.shape
    if n_components > d:
        raise ValueError(f"n_components={n_components} exceeds d_in={d}")
    counts = torch.zeros(n_clusters, dtype=torch.float64, device=acts.device)
    sums = torch.zeros(n_clusters, d, dtype=torch.float64, device=acts.device)
    second = torch.zeros(n_clusters, d, d, dtype=torch.float64, device=acts.device)
    for start in range(0, n, chunk_size):
        x, a = acts[start : start + chunk_size].double(), assign[start : start + chunk_size]
        counts.index_add_(0, a, torch.ones_like(x[:, 0]))
        sums.index_add_(0, a, x)
        step = max(1, 2**24 // (d * d))  # outer products of <= 128 MB at a time
        for s in range(0, x.shape[0], step):
            xs = x[s : s + step]
            second.index_add_(0, a[s : s + step], xs[:, :, None] * xs[:, None, :])
    means = sums / counts.clamp_min(1)[:, None]
    cov = second / counts.clamp_min(1)[:, None, None] - means[:, :, None] * means[:, None, :]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs.flip(-1)[:, :, :n_components].transpose(1, 2)  # [c, m, d]
    rank = evals.flip(-1)[:, :n_components] > 1e-12 * evals.abs().amax(-1, keepdim=True).clamp_min(
        1e-300
    )
    rank &= torch.arange(n_components, device=acts.device) < (counts[:, None] - 1)
    top = top * rank[:, :, None]
    return means.to(acts.dtype), top.to(acts.dtype)


# --- the SAEs --------------------------------------------------------------------------------


# --- fitting ---------------------------------------------------------------------------------


def _centroids(
    cached: CachedActivations,
    n_clusters: int,
    seed: int,
    max_iter: int,
    sample: int,
    progress: bool,
) -> Tensor:
    acts = cached.acts
    summary = summarise_activations(acts)  # validates (finite float [n, d]) before sampling
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    g = torch.Generator().manual_seed(seed)
    pool = acts[torch.randperm(acts.shape[0], generator=g)[: max(sample, n_clusters)]]
    init = kmeans_plus_plus(pool, n_clusters, seed=seed)
    return lloyd(acts, init, max_iter=max_iter, progress=progress, summary=summary)[0]


def fit_kmeans_sae(
    cached: CachedActivations,
    n_clusters: int,
    *,
    gain: bool = False,
    max_iter: int = 20,
    seed_sample: int = 16384,
    seed: int = 0,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> KMeansSAE:
    """Fit a k-means autoencoder with ``n_clusters`` latents (k-means++ on a sample, then Lloyd)."""
    centroids = _centroids(cached, n_clusters, seed, max_iter, seed_sample, progress)
    cfg = KMeansSAEConfig(d_in=centroids.shape[1], d_sae=n_clusters, gain=gain, device=str(device))
    set_metadata(cfg, cached.usage_metadata(model_name))
    empty = centroids.new_zeros(n_clusters, 0, centroids.shape[1])
    return KMeansSAE._from_parts(cfg, centroids, empty, device)


def fit_local_pca_sae(
    cached: CachedActivations,
    n_clusters: int,
    n_components: int,
    *,
    assignment: Literal["centroid", "flat"] = "centroid",
    flat_iters: int = 3,
    max_iter: int = 20,
    seed_sample: int = 16384,
    seed: int = 0,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LocalPCASAE:
    """Fit k-means + local PCA. With ``assignment="flat"``, ``flat_iters`` rounds of (reassign to
    the nearest flat, refit mean + PCA) follow the k-means partition; reconstruction error does not
    increase across rounds.

    With centroid assignment the encoder assigns with the k-means centroids the PCA's partition was
    made with, not the refit means (they differ until Lloyd converges)."""
    centroids = _centroids(cached, n_clusters, seed, max_iter, seed_sample, progress)
    acts = cached.acts
    cfg = LocalPCASAEConfig(
        d_in=acts.shape[1],
        d_sae=n_clusters * (1 + n_components),
        n_components=n_components,
        assignment=assignment,
        device=str(device),
    )
    set_metadata(cfg, cached.usage_metadata(model_name))

    def assignments(sae: LocalPCASAE) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    sae.assign(acts[s : s + CHUNK].to(sae.W_enc) @ sae.W_enc + sae.b_enc).cpu()
                    for s in range(0, acts.shape[0], CHUNK)
                ]
            )

    assign = assign_nearest(acts, centroids)
    means, dirs = local_pca(acts, assign, n_clusters, n_components)
    means = torch.where(
        (torch.bincount(assign, minlength=n_clusters) > 0)[:, None], means, centroids
    )
    if assignment == "centroid":
        return LocalPCASAE._from_parts(cfg, means, dirs, device, centroids=centroids)
    sae = LocalPCASAE._from_parts(cfg, means, dirs, device)
    for _ in range(flat_iters):
        assign = assignments(sae)
        means2, dirs2 = local_pca(acts, assign, n_clusters, n_components)
        keep = (torch.bincount(assign, minlength=n_clusters) > 0)[:, None]
        means = torch.where(keep, means2, means)
        dirs = torch.where(keep[:, :, None], dirs2, dirs)
        sae = LocalPCASAE._from_parts(cfg, means, dirs, device)
    return sae


@dataclass(frozen=True)
class KMeansConfig:
    """k-means autoencoder: one latent per cluster (L0 = 1)."""

    d_sae: int | None = None
    """Clusters = latents (default 8 x d_model)."""
    max_iter: int = 20
    """Lloyd iterations."""
    seed: int = 0
    """Seed of the k-means++ initialisation."""


@dataclass(frozen=True)
class LocalPCAConfig:
    """k-means + local PCA: d_sae // k clusters, each with k - 1 principal components."""

    d_sae: int | None = None
    """Latents (default 8 x d_model)."""
    k: int = 16
    """L0: the cluster indicator plus k - 1 components."""
    assignment: Literal["centroid", "flat"] = "centroid"
    """Assign inputs to the nearest centroid, or to the nearest affine flat (k-flats)."""
    max_iter: int = 20
    """Lloyd iterations."""
    seed: int = 0
    """Seed of the k-means++ initialisation."""


def fit_kmeans(
    cached: CachedActivations,
    cfg: KMeansConfig,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> KMeansSAE:
    """:func:`fit_kmeans_sae` from its config (the ``itda-lens train kmeans`` entry point)."""
    return fit_kmeans_sae(
        cached,
        default_width(cfg.d_sae, cached),
        max_iter=cfg.max_iter,
        seed=cfg.seed,
        model_name=model_name,
        device=device,
    )


def fit_local_pca(
    cached: CachedActivations,
    cfg: LocalPCAConfig,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> LocalPCASAE:
    """:func:`fit_local_pca_sae` from its config: ``d_sae // k`` clusters of ``k - 1`` components."""
    width = default_width(cfg.d_sae, cached)
    if width // cfg.k < 1:
        raise ValueError(f"d_sae {width} is smaller than k {cfg.k}: no room for a cluster")
    return fit_local_pca_sae(
        cached,
        width // cfg.k,
        cfg.k - 1,
        assignment=cfg.assignment,
        max_iter=cfg.max_iter,
        seed=cfg.seed,
        model_name=model_name,
        device=device,
    )
