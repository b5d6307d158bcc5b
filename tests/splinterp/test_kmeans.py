"""k-means and local-PCA autoencoders: maths against scikit-learn, encode/decode, sae_lens round trip."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from sae_lens import SAE
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from itda_lens.activations import CachedActivations, collect_activations
from itda_lens.evals import evaluate, saebench_core
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig, LocalPCASAE
from itda_lens.splinterp.kmeans import (
    _centroids,
    assign_nearest,
    fit_kmeans_sae,
    fit_local_pca_sae,
    kmeans_plus_plus,
    lloyd,
    local_pca,
    nearest,
)
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def blobs() -> torch.Tensor:
    """Anisotropic clusters around 12 centres in 10-D."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 10, generator=g, dtype=torch.float64) * 4
    shapes = torch.randn(12, 10, 10, generator=g, dtype=torch.float64) * 0.6
    which = torch.randint(12, (3000,), generator=g)
    noise = torch.randn(3000, 1, 10, generator=g, dtype=torch.float64)
    return centres[which] + (noise @ shapes[which])[:, 0]


def _cached(x: torch.Tensor) -> CachedActivations:
    return CachedActivations(x, torch.zeros(len(x), dtype=torch.long), HOOK, 32, 0.0)


def test_lloyd_matches_sklearn_from_the_same_start(blobs: torch.Tensor) -> None:
    init = kmeans_plus_plus(blobs, 12, seed=3)
    centroids, inertia = lloyd(blobs, init, max_iter=300, tol=0.0, chunk_size=700)
    ref = KMeans(12, init=init.numpy(), n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(
        blobs.numpy()
    )
    torch.testing.assert_close(centroids, torch.from_numpy(ref.cluster_centers_), atol=1e-9, rtol=0)
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)


def _same_rows(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-9) -> None:
    """``a`` and ``b`` hold the same rows up to order."""
    d = torch.cdist(a, b)
    match = d.argmin(1)
    assert len(torch.unique(match)) == len(b) and float(d.min(1).values.max()) <= atol


@pytest.mark.parametrize("init_rows", ["duplicates", "far_away"])
def test_lloyd_reseeds_each_empty_cluster_at_a_different_far_point(
    blobs: torch.Tensor, init_rows: str
) -> None:
    start = kmeans_plus_plus(blobs, 9, seed=2)
    extra = start[:3] if init_rows == "duplicates" else torch.full_like(start[:3], 1e3)
    init = torch.cat([start, extra])
    label, d2 = nearest(blobs, init)
    assert set(label.tolist()) == set(range(9))  # clusters 9, 10, 11 are empty
    for max_iter in (1, 300):  # the re-seeding step itself, then convergence from it
        centroids, inertia = lloyd(blobs, init, max_iter=max_iter, tol=0.0, chunk_size=700)
        assert len(torch.unique(centroids, dim=0)) == 12
        if max_iter == 1:  # the farthest points from their centroids, farthest first
            assert torch.equal(centroids[9:], blobs[d2.topk(3).indices])
        ref = KMeans(
            12, init=init.numpy(), n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd"
        ).fit(blobs.numpy())
        # which empty cluster gets which far point is an order sklearn leaves unspecified
        _same_rows(centroids, torch.from_numpy(ref.cluster_centers_))
        assert inertia == pytest.approx(ref.inertia_, rel=1e-9)


def test_kmeans_plus_plus_seeds_distinct_data_points(blobs: torch.Tensor) -> None:
    init = kmeans_plus_plus(blobs, 12, seed=1)
    assert len(torch.unique(init, dim=0)) == 12
    assert all(bool((blobs == c).all(1).any()) for c in init)
    with pytest.raises(ValueError, match="cannot seed"):
        kmeans_plus_plus(blobs[:5], 6)


def test_local_pca_matches_sklearn_per_cluster(blobs: torch.Tensor) -> None:
    centroids, _ = lloyd(blobs, kmeans_plus_plus(blobs, 12), tol=0.0, max_iter=100)
    assign = assign_nearest(blobs, centroids, chunk_size=500)
    means, dirs = local_pca(blobs, assign, 12, 3, chunk_size=500)
    for c in range(12):
        xc = blobs[assign == c].numpy()
        ref = PCA(3).fit(xc)
        torch.testing.assert_close(means[c], torch.from_numpy(ref.mean_), atol=1e-9, rtol=0)
        comp = torch.from_numpy(ref.components_)
        # the same subspace (signs of principal directions are arbitrary)
        torch.testing.assert_close(dirs[c].T @ dirs[c], comp.T @ comp, atol=1e-7, rtol=0)


def test_kmeans_sae_encodes_nearest_centroid_and_decodes_it(blobs: torch.Tensor) -> None:
    x = blobs.float()
    sae = fit_kmeans_sae(_cached(x), 12, progress=False)
    with torch.no_grad():
        z = sae.encode(x)
        xh = sae.decode(z)
    centroids = sae.W_dec
    brute = torch.cdist(x, centroids).argmin(1)
    assert torch.equal(z.argmax(1), brute) and torch.equal(
        (z != 0).sum(1), torch.ones(len(x)).long()
    )
    assert torch.equal(z.max(1).values, torch.ones(len(x)))
    torch.testing.assert_close(xh, centroids[brute])
    gain = fit_kmeans_sae(_cached(x), 12, gain=True, progress=False)
    with torch.no_grad():
        zg = gain.encode(x)
    mu = gain.W_dec[brute]
    torch.testing.assert_close(zg.sum(1), (x * mu).sum(1) / (mu * mu).sum(1), rtol=1e-4, atol=1e-5)


def test_local_pca_sae_reconstructs_with_the_cluster_flat(blobs: torch.Tensor) -> None:
    x = blobs.float()
    sae = fit_local_pca_sae(_cached(x), 12, 3, progress=False)
    assert isinstance(sae, LocalPCASAE) and sae.cfg.d_sae == 48
    with torch.no_grad():
        z = sae.encode(x)
        xh = sae.decode(z)
    blocks = sae.W_dec.reshape(12, 4, 10)
    c = torch.cdist(x, sae.W_enc[:, ::4].T / 2).argmin(1)  # the centroids, not the means
    mu, U = blocks[c, 0], blocks[c, 1:]
    ref = mu + torch.einsum("nmd,nm->nd", U, torch.einsum("nmd,nd->nm", U, x - mu))
    torch.testing.assert_close(xh, ref, atol=1e-4, rtol=1e-4)
    assert int((z != 0).sum(1).max()) <= 4
    sse = {"centroid": float(((xh - x) ** 2).sum())}
    flat = fit_local_pca_sae(_cached(x), 12, 3, assignment="flat", progress=False)
    with torch.no_grad():
        sse["flat"] = float(((flat(x) - x) ** 2).sum())
    assert sse["flat"] <= sse["centroid"] * (1 + 1e-5)  # k-flats rounds never hurt
    km = fit_kmeans_sae(_cached(x), 12, progress=False)
    with torch.no_grad():
        assert sse["centroid"] < float(((km(x) - x) ** 2).sum())  # affine pieces beat constants


def test_local_pca_sae_assigns_as_it_was_fitted(blobs: torch.Tensor) -> None:
    cached = _cached(blobs)
    sae = fit_local_pca_sae(cached, 12, 3, max_iter=1, progress=False)  # Lloyd not converged
    with torch.no_grad():
        assign = sae.encode(blobs)[:, ::4].argmax(1)
    centroids = _centroids(cached, 12, seed=0, max_iter=1, sample=16384, progress=False)
    assert torch.equal(assign, assign_nearest(blobs, centroids))  # the fitting's assignment
    means, dirs = local_pca(blobs, assign, 12, 3)
    blocks = sae.W_dec.reshape(12, 4, 10).double()
    torch.testing.assert_close(blocks[:, 0], means, atol=1e-5, rtol=0)
    proj = blocks[:, 1:].transpose(1, 2) @ blocks[:, 1:]
    torch.testing.assert_close(proj, dirs.transpose(1, 2) @ dirs, atol=1e-5, rtol=0)


def test_cluster_saes_round_trip_and_run_in_sae_lens(model, tmp_path) -> None:
    cached = collect_activations(model, make_tokens(48), HOOK)
    for name, sae in {
        "km": fit_kmeans_sae(cached, 16, model_name="tiny-0", progress=False),
        "pca": fit_local_pca_sae(
            cached, 8, 2, assignment="flat", model_name="tiny-0", progress=False
        ),
    }.items():
        sae.save_model(tmp_path / name)
        loaded = SAE.load_from_disk(tmp_path / name)
        assert type(loaded) is type(sae) and loaded.cfg.to_dict() == sae.cfg.to_dict()
        toks = make_tokens(4, seed=7)
        _, cache = model.run_with_cache_with_saes(toks, saes=[loaded])
        acts = cache[f"{HOOK}.hook_sae_input"].reshape(-1, cached.acts.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(loaded(acts), sae(acts))
        metrics = evaluate(loaded, model, make_tokens(16, seed=4))
        assert math.isfinite(metrics["explained_variance"]) and 1 <= metrics["l0"] <= 3
        core = saebench_core(loaded, model, make_tokens(16, seed=4))  # SAEBench, unchanged
        assert math.isfinite(core["model_performance_preservation.ce_loss_score"])
        loaded.cfg.metadata.model_name = None
        with pytest.raises(ValueError, match="model_name"):
            saebench_core(loaded, model, make_tokens(16, seed=4))


def test_cluster_configs_refuse_impossible_settings() -> None:
    from itda_lens.saes.cluster import LocalPCASAEConfig

    with pytest.raises(ValueError, match="multiple"):
        LocalPCASAEConfig(d_in=4, d_sae=10, n_components=2)
    with pytest.raises(ValueError, match="n_components"):
        LocalPCASAEConfig(d_in=4, d_sae=12, n_components=5)
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        KMeansSAEConfig(d_in=4, d_sae=3, apply_b_dec_to_input=True)
    with pytest.raises(NotImplementedError, match="regions"):
        KMeansSAE(KMeansSAEConfig(d_in=4, d_sae=3)).fold_W_dec_norm()
    bad = torch.randn(50, 4)
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_kmeans_sae(_cached(bad), 3, progress=False)


def test_importing_the_package_registers_the_cluster_architectures(tmp_path) -> None:
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    fit_local_pca_sae(_cached(x), 4, 2, progress=False).save_model(tmp_path)
    code = (
        "import itda_lens; from sae_lens import SAE; "
        f"print(type(SAE.load_from_disk(r'{tmp_path}')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "LocalPCASAE", out.stderr[-2000:]
