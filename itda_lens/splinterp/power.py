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
visits, occupancy entropy), ``latent_geometry`` (per latent: how often the SAE's own encoder fires
it — dead latents never do — and, from the diagram, its power weight, cell occupancy and the margin
by which a latent in no cell misses every one: how far it is from being selected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int, Shaped
from sae_lens import SAE
from torch import Tensor

from itda_lens.saes import ITDA
from itda_lens.saes.cluster import KMeansSAE, LocalPCASAE

CHUNK = 8192


@dataclass
class PowerDiagram:
    """Sites ``c``, weights ``r²`` and the order of a power diagram of ``sae``'s encoder.

    The cell of site ``s`` holds latents ``latent_of_site[s] + 0 … block − 1``: one latent per site
    for TopK SAEs; a cluster SAE's whole block (indicator, then coefficients) per centroid; an ITDA
    atom has two sites, ``±a/2``. Sites and weights are a snapshot of the encoder's weights.
    """

    sites: Float[Tensor, "m d"]
    weights: Float[Tensor, " m"]
    order: int
    latent_of_site: Int[Tensor, " m"]
    d_sae: int
    sae: SAE[Any] = field(repr=False, compare=False)
    block: int = 1

    def to_latents(
        self, per_site: Shaped[Tensor, " m"], reduce: Literal["sum", "amax"]
    ) -> Shaped[Tensor, " d_sae"]:
        """Per-site values ``[m]`` as per-latent values ``[d_sae]`` (on the CPU): each latent of a
        site's cell gets the site's value, summed or maxed over a latent's sites."""
        lat = (self.latent_of_site.cpu()[:, None] + torch.arange(self.block)).flatten()
        out = torch.full((self.d_sae,), 0 if reduce == "sum" else -math.inf, dtype=per_site.dtype)
        return out.scatter_reduce(0, lat, per_site.cpu().repeat_interleave(self.block), reduce)

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
    block = 1
    if isinstance(sae, ITDA):
        a = sae.W_dec.detach().double()
        sites = torch.cat([a, -a]) / 2
        latents = torch.arange(a.shape[0]).repeat(2)
        return PowerDiagram(sites, (sites * sites).sum(1), 1, latents, a.shape[0], sae)
    if isinstance(sae, LocalPCASAE | KMeansSAE):
        if getattr(sae.cfg, "assignment", "centroid") != "centroid":
            raise ValueError(
                "flat assignment uses a quadratic score: its regions are not a power diagram"
            )
        W, b = _affine(sae)
        ind = torch.arange(0, sae.cfg.d_sae, sae.cfg.block)
        W, b = W[:, ind], b[ind]
        order, latents, block = 1, ind, sae.cfg.block
    elif isinstance(getattr(sae.cfg, "k", None), int) and hasattr(sae, "W_enc"):
        W, b = _affine(sae)
        order, latents = int(sae.cfg.k), torch.arange(sae.cfg.d_sae)
    else:
        raise NotImplementedError(
            f"{type(sae).__name__} is not a TopK-style encoder; power diagrams describe TopK SAEs, "
            "cluster SAEs and ITDA's first pursuit step"
        )
    sites = W.T / 2
    return PowerDiagram(
        sites, (sites * sites).sum(1) + b, order, latents, sae.cfg.d_sae, sae, block
    )


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
    """Per latent, over the data: whether the encoder uses it, and where it sits in the diagram.

    - ``fires``: inputs on which the SAE's own ``encode`` gives it a non-zero code (an ITDA's atom:
      picked at any pursuit step with a non-zero coefficient). ``dead`` means it never fires.
    - ``occupancy``: inputs whose diagram cell holds it: its top-k set before the ReLU (TopK), its
      cluster's Voronoi cell for every latent of the block (cluster SAEs), its first pursuit pick
      (ITDA). A TopK latent can sit in cells and still be dead (the ReLU zeroes it there); an ITDA
      atom can be in no cell and fire (picked at later steps).
    - ``margin``: the largest amount by which its score beats the order-k threshold; < 0 exactly
      when ``occupancy`` is 0, and then ``−margin`` is the power-weight increase (bias increase,
      for a TopK SAE) that would put it in some input's cell: how far it is from being selected.
    - ``weights``: the power weight ``r²`` of its site (its cluster's for a cluster SAE's block).
    """

    weights: Float[Tensor, " d_sae"]
    occupancy: Int[Tensor, " d_sae"]
    margin: Float[Tensor, " d_sae"]
    fires: Int[Tensor, " d_sae"]

    @property
    def dead(self) -> Bool[Tensor, " d_sae"]:
        """Latents the encoder never fires on the data."""
        return self.fires == 0

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


def _fires(sae: SAE[Any], x: Float[Tensor, "n d"]) -> Int[Tensor, " d_sae"]:
    """On how many inputs of ``x`` the SAE's own encoder gives each latent a non-zero code."""
    d = sae.cfg.d_sae
    with torch.no_grad():
        x = x.to(sae.device)
        if isinstance(sae, ITDA):  # sparse codes: no [n, d_sae] matrix for wide dictionaries
            code = sae.encode_sparse(x)
            row = torch.arange(len(x), device=x.device)[:, None].expand_as(code.indices)
            used = code.values != 0
            pairs = torch.unique(row[used] * d + code.indices[used])  # an atom picked twice: once
            return torch.bincount(pairs % d, minlength=d).cpu()
        z = sae.encode(x)
        return ((z.to_dense() if z.is_sparse else z) != 0).sum(0).cpu()


def latent_geometry(
    diagram: PowerDiagram, acts: Float[Tensor, "n d"], chunk_size: int = CHUNK
) -> LatentGeometry:
    """Firing counts (from ``diagram.sae``'s encoder) and cell occupancy and margins (from the
    diagram) of every latent over ``acts``, streamed in chunks; see ``LatentGeometry``."""
    m = diagram.sites.shape[0]
    occupancy = torch.zeros(m, dtype=torch.long)
    margin = torch.full((m,), -math.inf, dtype=torch.float64)
    fires = torch.zeros(diagram.d_sae, dtype=torch.long)
    for s in range(0, acts.shape[0], chunk_size):
        x = acts[s : s + chunk_size]
        fires += _fires(diagram.sae, x)
        h = diagram.scores(x.double())
        top, idx = h.topk(min(diagram.order + 1, m), dim=1)
        kth = top[:, diagram.order - 1 : diagram.order]
        # members are compared with the first non-member, the others with the k-th member
        nxt = top[:, diagram.order :] if m > diagram.order else kth
        member = torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx[:, : diagram.order], True)
        slack = torch.where(member, h - nxt, h - kth)
        margin = torch.maximum(margin, slack.max(0).values.cpu())
        occupancy += member.sum(0).cpu()
    return LatentGeometry(
        weights=diagram.to_latents(diagram.weights.double(), "amax"),
        occupancy=diagram.to_latents(occupancy, "sum"),
        margin=diagram.to_latents(margin, "amax"),
        fires=fires,
    )
