"""Fitting the cluster SAEs (:mod:`itda_lens.saes.cluster`): k-means++ seeding on a sample,
then exact Lloyd passes (``lloyd``, checked against scikit-learn), then per-cluster covariances
for the local PCA. Everything streams over the activations in chunks.
"""

from __future__ import annotations

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
    scikit-learn does). An empty cluster is re-seeded at the point farthest from its centroid.
    ``summary``: ``summarise_activations(acts)`` if the caller already has it (saves a pass).
    """
    summary = summary or summarise_activations(acts, chunk_size)
    var = float(summary.variance.mean())
    centroids = init.to(acts.device, torch.float64).clone()
    n = acts.shape[0]
    for _ in tqdm(range(max_iter), desc="k-means", disable=not progress):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(centroids.shape[0], dtype=torch.float64, device=acts.device)
        far_d, far_i = -1.0, 0
        for start in range(0, n, chunk_size):
            x = acts[start : start + chunk_size]
            idx, d2 = nearest(x, centroids.to(x.dtype))  # distances in the input's dtype
            sums.index_add_(0, idx, x.double())
            counts.index_add_(0, idx, torch.ones_like(d2, dtype=torch.float64))
            m, j = d2.max(0)
            if float(m) > far_d:
                far_d, far_i = float(m), start + int(j)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        for c in (counts == 0).nonzero().flatten().tolist():
            new[c] = acts[far_i].double()
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol * var:
            break
    inertia = sum(  # of the returned centroids
        float(nearest(acts[s : s + chunk_size], centroids.to(acts.dtype))[1].double().sum())
        for s in range(0, n, chunk_size)
    )
    return centroids.to(acts.dtype), inertia


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
    increase across rounds."""
    centroids = _centroids(cached, n_clusters, seed, max_iter, seed_sample, progress)
    acts = cached.acts
    cfg = LocalPCASAEConfig(
        d_in=acts.shape[1],
        d_sae=n_clusters * (1 + n_components),
        n_components=n_components,
        assignment="centroid",
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
    sae = LocalPCASAE._from_parts(cfg, means, dirs, device)
    if assignment == "flat":
        sae.cfg.assignment = "flat"
        for _ in range(flat_iters):
            assign = assignments(sae)
            means2, dirs2 = local_pca(acts, assign, n_clusters, n_components)
            keep = (torch.bincount(assign, minlength=n_clusters) > 0)[:, None]
            means = torch.where(keep, means2, means)
            dirs = torch.where(keep[:, :, None], dirs2, dirs)
            sae = LocalPCASAE._from_parts(sae.cfg, means, dirs, device)
    return sae
