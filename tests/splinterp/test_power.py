"""Power diagrams: TopK regions are order-k power cells; region statistics; dead latents."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE, StandardSAEConfig, TopKSAEConfig
from scipy.stats import spearmanr

from itda_lens import ITDA
from itda_lens.activations import CachedActivations
from itda_lens.pursuit import matching_pursuit
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig
from itda_lens.splinterp.kmeans import fit_kmeans_sae, fit_local_pca_sae
from itda_lens.splinterp.power import (
    LatentGeometry,
    latent_geometry,
    power_diagram,
    region_ids,
    region_stats,
)


def _cached(x: torch.Tensor) -> CachedActivations:
    return CachedActivations(x, torch.zeros(len(x), dtype=torch.long), "h", 8, 0.0)


def _topk_sae(d_in: int = 6, d_sae: int = 40, k: int = 5, **cfg) -> SAE:
    sae = SAE.from_dict(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg).to_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * torch.rand(d_sae, 1, generator=g))
    return sae


@pytest.mark.parametrize(
    "cfg", [{}, {"rescale_acts_by_decoder_norm": True}, {"apply_b_dec_to_input": False}]
)
def test_topk_region_is_the_order_k_power_cell(cfg: dict) -> None:
    sae = _topk_sae(**cfg)
    x = torch.randn(1000, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    diagram = power_diagram(sae)
    # brute force: the k sites with the smallest ||x - c||^2 - r^2
    brute = diagram.power_distances(x).topk(5, dim=1, largest=False).indices.sort(1).values
    ids = region_ids(diagram, x, chunk_size=300)
    assert torch.equal(ids, brute)
    top1 = region_ids(diagram, x, order=1)[:, 0]
    assert torch.equal(top1, diagram.power_distances(x).argmin(1))  # the ordinary power diagram
    with pytest.raises(ValueError, match="order"):
        region_ids(diagram, x, order=0)
    pre = []
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: pre.append(t))
    with torch.no_grad():
        z = sae.encode(x.float())
    sae.reset_hooks()
    if sae.cfg.rescale_acts_by_decoder_norm:  # sae_lens ranks pre-activations times decoder norms
        pre[0] = pre[0] * sae.W_dec.norm(dim=1)
    assert torch.equal(pre[0].topk(5, dim=1).indices.sort(1).values, ids)
    # sae_lens's ReLU after top-k keeps exactly the cell members with positive pre-activation
    in_cell = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(z != 0, in_cell & (pre[0] > 0))


def test_kmeans_sae_diagram_is_voronoi() -> None:
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    km = fit_kmeans_sae(_cached(x), 7, progress=False)
    diagram = power_diagram(km)
    assert diagram.order == 1
    torch.testing.assert_close(
        diagram.weights, torch.zeros(7, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(diagram.sites.float(), km.W_dec, atol=1e-5, rtol=0)
    assert torch.equal(region_ids(diagram, x)[:, 0], torch.cdist(x, km.W_dec).argmin(1))
    flat = fit_local_pca_sae(_cached(x), 3, 1, assignment="flat", progress=False)
    with pytest.raises(ValueError, match="quadratic"):
        power_diagram(flat)


def test_itda_first_pursuit_pick_is_its_signed_voronoi_cell() -> None:
    g = torch.Generator().manual_seed(0)
    itda = ITDA.from_atoms(torch.randn(30, 8, generator=g), k=3)
    x = torch.randn(400, 8, generator=g)
    first = matching_pursuit(x, itda.W_dec, 1)
    diagram = power_diagram(itda)
    site = region_ids(diagram, x)[:, 0]
    assert torch.equal(diagram.latent_of_site[site], first.indices[:, 0])
    assert torch.equal(site >= 30, first.values[:, 0] < 0)  # the sign picks the site ±a/2


def test_region_stats_counts_and_entropy() -> None:
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 4]])
    stats = region_stats(ids)
    assert (stats.n_points, stats.n_regions, stats.singleton_regions) == (4, 3, 2)
    assert stats.entropy_bits == pytest.approx(1.5)
    assert stats.largest_share == 0.5 and stats.perplexity == pytest.approx(2**1.5)


def test_dead_latents_and_the_margin_that_revives_them() -> None:
    sae = _topk_sae()
    with torch.no_grad():
        sae.b_enc[7] = -1e3  # never in any top-5 set
    x = torch.randn(800, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    geometry = latent_geometry(power_diagram(sae), x, chunk_size=256)
    assert int(geometry.occupancy.sum()) == 800 * 5
    ids = region_ids(power_diagram(sae), x)
    assert torch.equal(geometry.occupancy, torch.bincount(ids.flatten(), minlength=40))
    assert bool(geometry.dead[7]) and float(geometry.margin[7]) < 0
    assert torch.equal(geometry.occupancy == 0, geometry.margin < 0)
    with torch.no_grad():  # raising its power weight by just over -margin puts it in a cell
        sae.b_enc[7] += -float(geometry.margin[7]) + 1e-3
    revived = latent_geometry(power_diagram(sae), x)
    assert int(revived.occupancy[7]) > 0 and float(revived.margin[7]) > 0
    ref = spearmanr(geometry.weights.numpy(), geometry.occupancy.numpy()).statistic
    assert geometry.weight_occupancy_correlation() == pytest.approx(ref, abs=1e-12)


def _geometry_checked(sae: SAE, x: torch.Tensor) -> LatentGeometry:
    """``latent_geometry`` over ``x``, checked against what dead means: the SAE's own ``encode``
    never gives the latent a non-zero code. Also: no cell <=> negative margin."""
    geometry = latent_geometry(power_diagram(sae), x, chunk_size=128)
    with torch.no_grad():
        fires = (sae.encode(x) != 0).sum(0)
    assert torch.equal(geometry.dead, fires == 0)
    assert torch.equal(geometry.fires, fires)
    assert torch.equal(geometry.occupancy == 0, geometry.margin < 0)
    return geometry


def test_itda_atoms_used_at_any_pursuit_step_are_alive() -> None:
    g = torch.Generator().manual_seed(0)
    itda = ITDA.from_atoms(torch.randn(200, 8, generator=g), k=6)
    x = torch.randn(500, 8, generator=g)
    geometry = _geometry_checked(itda, x)
    first = matching_pursuit(x, itda.W_dec, 1).indices[:, 0]
    assert torch.equal(geometry.occupancy, torch.bincount(first, minlength=200))
    # every atom is used, many of them never as the first pick
    assert not bool(geometry.dead.any()) and int((geometry.occupancy == 0).sum()) > 10
    torch.testing.assert_close(geometry.weights, torch.full((200,), 0.25, dtype=torch.float64))


def test_kmeans_sae_latent_fires_in_its_voronoi_cell() -> None:
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    km = fit_kmeans_sae(_cached(x), 7, progress=False)
    centroids = torch.cat([km.W_dec.detach(), torch.full((1, 4), 50.0)])  # one far from the data
    sae = KMeansSAE._from_parts(
        KMeansSAEConfig(d_in=4, d_sae=8), centroids, centroids.new_zeros(8, 0, 4), "cpu"
    )
    geometry = _geometry_checked(sae, x)
    assert torch.equal(geometry.occupancy, geometry.fires)  # one-hot codes
    assert torch.equal(geometry.dead, torch.arange(8) == 7)


def test_local_pca_coefficient_latents_share_their_cluster_cell() -> None:
    x = torch.randn(600, 5, generator=torch.Generator().manual_seed(1))
    sae = fit_local_pca_sae(_cached(x), 8, 3, progress=False)
    geometry = _geometry_checked(sae, x)
    assert not bool(geometry.dead.any())
    cells = torch.bincount(region_ids(power_diagram(sae), x)[:, 0], minlength=8)
    assert torch.equal(geometry.occupancy.view(8, 4), cells[:, None].expand(8, 4))
    for field in (geometry.margin, geometry.weights):  # the block's indicator's, for all of it
        assert torch.equal(field.view(8, 4), field.view(8, 4)[:, :1].expand(8, 4))


def test_topk_latents_in_cells_that_never_pass_the_relu_are_dead() -> None:
    sae = _topk_sae()
    x = torch.randn(800, 6, generator=torch.Generator().manual_seed(3))
    before = latent_geometry(power_diagram(sae), x)
    with torch.no_grad():
        sae.b_enc -= 6  # a shared shift: the same top-k cells, but many members now stay <= 0
    after = _geometry_checked(sae, x)
    assert torch.equal(after.occupancy, before.occupancy)
    torch.testing.assert_close(after.margin, before.margin, atol=1e-5, rtol=0)  # b_enc: fp32
    assert int((after.dead & (after.occupancy > 0)).sum()) > 0


def test_power_diagram_refuses_non_topk_and_normalised_saes() -> None:
    relu = SAE.from_dict(StandardSAEConfig(d_in=4, d_sae=8).to_dict())
    with pytest.raises(NotImplementedError, match="TopK"):
        power_diagram(relu)
    normed = _topk_sae(normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="normalisation"):
        power_diagram(normed)
    with pytest.raises(ValueError, match="activations"):
        region_ids(power_diagram(_topk_sae()), torch.randn(3, 5))
    assert math.isnan(
        latent_geometry(
            power_diagram(_topk_sae(d_sae=5, k=5)), torch.randn(10, 6)
        ).weight_occupancy_correlation()
    )
