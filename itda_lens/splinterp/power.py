"""Power-diagram diagnostics (SplInterp §3): the regions of TopK-style encoders.

For affine pre-activations ``h_i(x) = w_iᵀx + b_i``,
``‖x − c_i‖² − r_i² = ‖x‖² − h_i(x)`` with site ``c_i = w_i/2`` and weight ``r_i² = ‖w_i‖²/4 + b_i``,
so the top-k latents of ``x`` are its k nearest sites in power distance: the inputs sharing a
top-k set form one cell of the order-k power diagram. ``power_diagram`` gives the sites and
weights of a sae_lens TopK SAE (order k), a k-means / centroid-assigned local-PCA SAE (order 1,
zero weights: a Voronoi diagram) and an ITDA's first matching-pursuit pick (order 1 over the 2n
sites ``±a_i/2``: the first pick maximises ``|⟨x, a_i⟩|``). sae_lens's TopK then applies a ReLU,
which only zeroes cell members with ``h_i ≤ 0``.

Diagnostics: ``region_ids`` (the cell of each input), ``region_stats`` (how many regions the data
visits, occupancy entropy), ``latent_geometry`` (per-latent power weight, occupancy and the margin
by which a never-selected latent misses every cell: dead latents, and how far each is from alive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from itda_lens.saes import ITDA
from itda_lens.saes.cluster import KMeansSAE, LocalPCASAE

CHUNK = 8192


@dataclass
class PowerDiagram:
    """Sites ``c``, weights ``r²`` and the order of a power diagram; ``latent_of_site`` maps sites
    to SAE latents (ITDA has two sites, ``±a/2``, per atom)."""

    sites: Float[Tensor, "m d"]
    weights: Float[Tensor, " m"]
    order: int
    latent_of_site: Int[Tensor, " m"]
    d_sae: int

    def scores(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        """``‖x‖² − power distance`` = the affine pre-activations ``2cᵀx + r² − ‖c‖²``."""
        c = self.sites.to(x.dtype)
        return 2 * x @ c.T + (self.weights.to(x.dtype) - (c * c).sum(1))

    def power_distances(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n m"]:
        """``‖x − c_i‖² − r_i²`` computed literally (for checks; ``scores`` is what is used)."""
        c = self.sites.to(x.dtype)
        return ((x[:, None, :] - c[None]) ** 2).sum(-1) - self.weights.to(x.dtype)


def _affine(sae: SAE[Any]) -> tuple[Tensor, Tensor]:
    """``(W [d_in, d_sae], b [d_sae])`` with pre-activations ``x W + b`` on the raw input."""
    cfg = sae.cfg
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"power_diagram needs an SAE on raw activations; fold its normalisation first "
            f"(normalize_activations={cfg.normalize_activations!r})"
        )
    W, b = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    if cfg.apply_b_dec_to_input:
        b = b - sae.b_dec.detach().double() @ W
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        norms = sae.W_dec.detach().double().norm(dim=1)
        W, b = W * norms, b * norms
    return W, b


def power_diagram(sae: SAE[Any]) -> PowerDiagram:
    """The power diagram whose cells are the encoder's regions (see the module docstring)."""
    if isinstance(sae, ITDA):
        a = sae.W_dec.detach().double()
        sites = torch.cat([a, -a]) / 2
        latents = torch.arange(a.shape[0]).repeat(2)
        return PowerDiagram(sites, (sites * sites).sum(1), 1, latents, a.shape[0])
    if isinstance(sae, LocalPCASAE | KMeansSAE):
        if getattr(sae.cfg, "assignment", "centroid") != "centroid":
            raise ValueError(
                "flat assignment uses a quadratic score: its regions are not a power diagram"
            )
        W, b = _affine(sae)
        ind = torch.arange(0, sae.cfg.d_sae, sae.cfg.block)
        W, b = W[:, ind], b[ind]
        order, latents = 1, ind
    elif isinstance(getattr(sae.cfg, "k", None), int) and hasattr(sae, "W_enc"):
        W, b = _affine(sae)
        order, latents = int(sae.cfg.k), torch.arange(sae.cfg.d_sae)
    else:
        raise NotImplementedError(
            f"{type(sae).__name__} is not a TopK-style encoder; power diagrams describe TopK SAEs, "
            "cluster SAEs and ITDA's first pursuit step"
        )
    sites = W.T / 2
    return PowerDiagram(sites, (sites * sites).sum(1) + b, order, latents, sae.cfg.d_sae)


def region_ids(
    diagram: PowerDiagram,
    acts: Float[Tensor, "n d"],
    chunk_size: int = CHUNK,
    *,
    order: int | None = None,
) -> Int[Tensor, "n order"]:
    """Sorted site indices of each input's order-k cell (ties broken as ``torch.topk`` does).

    ``order`` overrides the diagram's (e.g. ``order=1``: the cell of the top latent alone, which
    stays informative when order-k cells are so many that every input has its own).
    """
    if acts.ndim != 2 or acts.shape[1] != diagram.sites.shape[1]:
        raise ValueError(f"need activations [n, {diagram.sites.shape[1]}], got {tuple(acts.shape)}")
    order = diagram.order if order is None else order
    if not 1 <= order <= diagram.sites.shape[0]:
        raise ValueError(f"order must be in [1, {diagram.sites.shape[0]}], got {order}")
    out = []
    for s in range(0, acts.shape[0], chunk_size):
        h = diagram.scores(acts[s : s + chunk_size].double())
        out.append(h.topk(order, dim=1).indices.sort(1).values)
    return torch.cat(out)


@dataclass
class RegionStats:
    n_points: int
    n_regions: int
    entropy_bits: float
    largest_share: float
    singleton_regions: int

    @property
    def perplexity(self) -> float:
        """Effective number of regions, ``2**entropy``."""
        return 2**self.entropy_bits


def region_stats(ids: Int[Tensor, "n order"]) -> RegionStats:
    """How piecewise the data sees the encoder: distinct regions, occupancy entropy and skew."""
    _, counts = torch.unique(ids, dim=0, return_counts=True)
    p = counts.double() / ids.shape[0]
    return RegionStats(
        n_points=ids.shape[0],
        n_regions=len(counts),
        entropy_bits=float(-(p * p.log2()).sum()),
        largest_share=float(p.max()),
        singleton_regions=int((counts == 1).sum()),
    )


@dataclass
class LatentGeometry:
    """Per latent: power weight, how often it is in a cell, and ``margin`` = the largest amount by
    which its score beats the order-k threshold on the data (< 0: dead; −margin is the weight
    increase that would revive it)."""

    weights: Float[Tensor, " d_sae"]
    occupancy: Int[Tensor, " d_sae"]
    margin: Float[Tensor, " d_sae"]

    @property
    def dead(self) -> Tensor:
        return self.occupancy == 0

    def weight_occupancy_correlation(self) -> float:
        """Spearman correlation of power weight and occupancy (NaN if either is constant)."""
        a, b = (_ranks(v) for v in (self.weights, self.occupancy.double()))
        a, b = a - a.mean(), b - b.mean()
        denom = float(a.norm() * b.norm())
        return float(a @ b) / denom if denom > 0 else math.nan


def _ranks(v: Tensor) -> Tensor:
    """Ranks with ties given their average rank (as Spearman's correlation needs)."""
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((2 * ends - counts - 1) / 2)[inverse]


def latent_geometry(
    diagram: PowerDiagram, acts: Float[Tensor, "n d"], chunk_size: int = CHUNK
) -> LatentGeometry:
    """Occupancy and margins of every latent over ``acts`` (streamed in chunks)."""
    m = diagram.sites.shape[0]
    occupancy = torch.zeros(m, dtype=torch.long)
    margin = torch.full((m,), -math.inf, dtype=torch.float64)
    for s in range(0, acts.shape[0], chunk_size):
        h = diagram.scores(acts[s : s + chunk_size].double())
        top, idx = h.topk(min(diagram.order + 1, m), dim=1)
        kth = top[:, diagram.order - 1 : diagram.order]
        # members are compared with the first non-member, the others with the k-th member
        nxt = top[:, diagram.order :] if m > diagram.order else kth
        member = torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx[:, : diagram.order], True)
        slack = torch.where(member, h - nxt, h - kth)
        margin = torch.maximum(margin, slack.max(0).values.cpu())
        occupancy += member.sum(0).cpu()
    d = diagram.d_sae
    lat = diagram.latent_of_site
    occ = torch.zeros(d, dtype=torch.long).index_add_(0, lat, occupancy)
    mar = torch.full((d,), -math.inf, dtype=torch.float64).scatter_reduce(0, lat, margin, "amax")
    w = torch.full((d,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, lat, diagram.weights.double().cpu(), "amax"
    )
    return LatentGeometry(w, occ, mar)
