"""PAM-SGD: the closed-form decoder against brute-force least squares, training, sae_lens round trip."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE, AbsTopKSAE, StandardSAE, TopKSAE

from itda_lens.activations import CachedActivations, collect_activations
from itda_lens.evals import evaluate, saebench_core
from itda_lens.splinterp.pam import (
    DecoderStats,
    PAMSettings,
    _codes,
    activation_fn,
    solve_decoder,
    to_sae_lens,
    train_pam,
)
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"


def _brute_force(z, x, W0, b0, alpha, beta, mu, nu):
    """Stack data rows and one row per penalty, then ordinary least squares for [W; b] at once."""
    n, d = z.shape
    p = x.shape[1]
    eye = torch.eye(d + 1, dtype=z.dtype)
    rows = [torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], 1)]
    targets = [x]
    w_part, b_part = eye[:d], eye[d:]
    for scale, design, target in [
        (alpha, w_part, torch.zeros(d, p, dtype=z.dtype)),
        (mu, w_part, W0),
        (beta, b_part, torch.zeros(1, p, dtype=z.dtype)),
        (nu, b_part, b0[None]),
    ]:
        rows.append(math.sqrt(scale) * design)
        targets.append(math.sqrt(scale) * target)
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution
    return sol[:d], sol[d]


def _problem(seed: int, n: int = 300, d: int = 12, p: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64).relu()
    x = torch.randn(n, p, generator=g, dtype=torch.float64) + 3
    W0 = torch.randn(d, p, generator=g, dtype=torch.float64)
    b0 = torch.randn(p, generator=g, dtype=torch.float64)
    return z, x, W0, b0


@pytest.mark.parametrize(
    ("alpha", "beta", "mu", "nu"),
    [(0.0, 0.0, 0.0, 0.0), (1e-3, 0.0, 0.0, 0.0), (0.5, 2.0, 3.0, 40.0), (0.0, 0.0, 5.0, 0.0)],
)
def test_closed_form_decoder_equals_brute_force_least_squares(alpha, beta, mu, nu) -> None:
    z, x, W0, b0 = _problem(1)
    stats = DecoderStats.empty(z.shape[1], x.shape[1])
    for start in range(0, len(z), 64):  # accumulated in batches, as in training
        stats.add(z[start : start + 64], x[start : start + 64])
    W, b = solve_decoder(stats, W0, b0, alpha=alpha, beta=beta, mu=mu, nu=nu)
    W_ref, b_ref = _brute_force(z, x, W0, b0, alpha, beta, mu, nu)
    torch.testing.assert_close(W, W_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b, b_ref, atol=1e-9, rtol=1e-9)


def test_sse_from_statistics_matches_direct_sum() -> None:
    z, x, W0, b0 = _problem(2)
    stats = DecoderStats.empty(z.shape[1], x.shape[1])
    stats.add(z, x)
    direct = float(((z @ W0 + b0 - x) ** 2).sum())
    assert stats.sse(W0, b0) == pytest.approx(direct, rel=1e-10)
    W, b = solve_decoder(stats, W0, b0)
    assert stats.sse(W, b) < direct  # the solve minimises exactly this


def test_singular_system_and_bad_inputs_are_refused() -> None:
    z, x, W0, b0 = _problem(3)
    z[:, 0] = 0  # a latent that never fires
    stats = DecoderStats.empty(z.shape[1], x.shape[1])
    stats.add(z, x)
    with pytest.raises(ValueError, match="singular"):
        solve_decoder(stats, W0, b0)
    solve_decoder(stats, W0, b0, alpha=1e-6)  # a ridge fixes it
    with pytest.raises(ValueError, match="alpha"):
        solve_decoder(stats, W0, b0, alpha=-1.0)
    with pytest.raises(ValueError, match="no data"):
        solve_decoder(DecoderStats.empty(3, 2), W0[:3, :2], b0[:2])
    with pytest.raises(ValueError, match="d_sae"):
        stats.add(z[:, :5], x)


@pytest.fixture(scope="module")
def sparse_data() -> CachedActivations:
    """Inputs that really are sparse combinations of 96 directions, plus noise and an offset."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(96, 24, generator=g)
    mask = torch.rand(4096, 96, generator=g) < 0.04
    x = (mask * torch.rand(4096, 96, generator=g) * 3) @ dirs + 0.05 * torch.randn(4096, 24) + 1.5
    return CachedActivations(x, torch.zeros(4096, dtype=torch.long), HOOK, 32, 0.0)


@pytest.mark.parametrize("decoder", ["pam", "adam"])
def test_training_loss_decreases_and_the_saved_sae_is_what_was_trained(
    sparse_data: CachedActivations, decoder: str
) -> None:
    settings = PAMSettings(d_sae=128, k=6, epochs=5, decoder=decoder)  # type: ignore[arg-type]
    result = train_pam(sparse_data, settings, progress=False)
    assert len(result.history) == (6 if decoder == "pam" else 5)
    assert result.history[-1] < 0.9 * result.history[0]
    if decoder == "pam":  # each exact solve + proximal encoder pass improves on the last here
        assert all(b < a for a, b in zip(result.history, result.history[1:], strict=False))
    sae, x = result.sae, sparse_data.acts
    assert isinstance(sae, TopKSAE) and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata.hook_name == HOOK
    with torch.no_grad():
        assert int((sae.encode(x) != 0).sum(-1).max()) <= 6
        # the returned SAE (scale folded in) reproduces the last training loss in original units
        scale2 = x.shape[1] / float(x.double().norm(dim=1).mean()) ** 2
        mse = float(((sae(x).double() - x) ** 2).sum(1).mean()) * scale2
    assert mse == pytest.approx(result.history[-1], rel=1e-3)


def test_pam_beats_its_own_adam_ablation_on_few_samples(sparse_data: CachedActivations) -> None:
    """The sample-efficiency mechanism on a small, clearly sparse problem (same encoder steps)."""
    small = CachedActivations(sparse_data.acts[:1024], sparse_data.token_ids[:1024], HOOK, 32, 0.0)
    fvu = {}
    for decoder in ("pam", "adam"):
        sae = train_pam(
            small, PAMSettings(d_sae=128, k=6, epochs=4, decoder=decoder), progress=False
        ).sae
        x = sparse_data.acts[2048:]  # held out
        with torch.no_grad():
            fvu[decoder] = float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu["pam"] < fvu["adam"]


def test_relu_variant_gives_a_standard_sae(sparse_data: CachedActivations) -> None:
    result = train_pam(sparse_data, PAMSettings(d_sae=64, k=None, epochs=2), progress=False)
    assert isinstance(result.sae, StandardSAE) and result.history[-1] < result.history[0]


def test_abstopk_variant_trains_with_signed_codes_and_saves_what_it_trained(
    sparse_data: CachedActivations,
) -> None:
    """On centred data PAM abs-TopK codes are signed, exactly k per row; the saved ``abstopk`` SAE
    encodes exactly as PAM's encoder does with its weights, and reproduces the training loss (so the
    decoder solves used the signed codes too, not top-k-then-ReLU ones)."""
    x = sparse_data.acts - sparse_data.acts.mean(0)
    centred = CachedActivations(x, sparse_data.token_ids, HOOK, 32, 0.0)
    settings = PAMSettings(d_sae=64, k=5, epochs=3, activation="abstopk")
    assert settings.architecture == "abstopk"
    result = train_pam(centred, settings, progress=False)
    sae = result.sae
    assert isinstance(sae, AbsTopKSAE) and sae.cfg.k == 5 and not sae.cfg.apply_b_dec_to_input
    assert len(result.history) == 4
    assert all(b < a for a, b in zip(result.history, result.history[1:], strict=False))
    with torch.no_grad():
        z = sae.encode(x)
        pam_z = _codes(x, sae.W_enc, sae.b_enc, activation_fn("abstopk", 5))
        scale2 = x.shape[1] / float(x.double().norm(dim=1).mean()) ** 2
        mse = float(((sae.decode(z).double() - x) ** 2).sum(1).mean()) * scale2
    assert torch.equal(z, pam_z)
    assert bool(((z != 0).sum(-1) == 5).all())
    assert float((z < 0).sum()) > 0.2 * float((z != 0).sum())  # really signed, not a stray few
    assert mse == pytest.approx(result.history[-1], rel=1e-3)
    with torch.no_grad():  # the ReLU-after-top-k codes of the same encoder reconstruct worse
        relu_z = _codes(x, sae.W_enc, sae.b_enc, activation_fn("topk", 5))
        relu_mse = float(((sae.decode(relu_z).double() - x) ** 2).sum(1).mean()) * scale2
    assert relu_mse > 1.1 * mse


def test_activation_setting_keeps_the_k_convention() -> None:
    assert PAMSettings(d_sae=32, k=16).activation == "topk"
    assert PAMSettings(d_sae=32, k=16).architecture == "topk"
    relu = PAMSettings(d_sae=32, k=None)
    assert relu.activation == "relu" and relu.architecture == "standard"
    forced = PAMSettings(d_sae=32, k=16, activation="relu")
    assert forced.k is None and forced.architecture == "standard"
    with pytest.raises(ValueError, match="needs k"):
        PAMSettings(d_sae=32, k=None, activation="abstopk")
    with pytest.raises(ValueError, match="topk, abstopk, relu"):
        PAMSettings(d_sae=32, k=4, activation="jumprelu")  # type: ignore[arg-type]


def test_settings_validation(sparse_data: CachedActivations) -> None:
    with pytest.raises(ValueError, match="k must be"):
        PAMSettings(d_sae=8, k=9)
    with pytest.raises(ValueError, match="alpha > 0 or mu_dec"):
        PAMSettings(d_sae=8, k=2, alpha=0.0)
    with pytest.raises(ValueError, match="decoder"):
        PAMSettings(d_sae=8, k=2, decoder="sgd")  # type: ignore[arg-type]
    bad = sparse_data.acts.clone()
    bad[3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        train_pam(
            CachedActivations(bad, sparse_data.token_ids, HOOK, 32, 0.0), PAMSettings(d_sae=8, k=2)
        )


def test_pam_sae_runs_in_sae_lens_and_transformer_lens(model, tmp_path) -> None:
    cached = collect_activations(model, make_tokens(48), HOOK)
    sae = train_pam(
        cached, PAMSettings(d_sae=64, k=4, epochs=2), model_name="tiny-0", progress=False
    ).sae
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, TopKSAE) and loaded.cfg.k == 4
    toks = make_tokens(4, seed=5)
    _, cache = model.run_with_cache_with_saes(toks, saes=[loaded])
    assert f"{HOOK}.hook_sae_acts_post" in cache
    metrics = evaluate(loaded, model, make_tokens(16, seed=4))
    assert math.isfinite(metrics["explained_variance"]) and 0 < metrics["l0"] <= 4
    core = saebench_core(loaded, model, make_tokens(16, seed=4))
    assert math.isfinite(core["model_performance_preservation.ce_loss_score"])


def test_to_sae_lens_keeps_weights_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(8, 16, generator=g), torch.randn(16, 8, generator=g)
    b_enc, b_dec = torch.randn(16, generator=g), torch.randn(8, generator=g)
    sae = to_sae_lens(W_enc, b_enc, W_dec, b_dec, k=3)
    x = torch.randn(5, 8, generator=g)
    pre = x @ W_enc + b_enc
    vals, idx = pre.topk(3)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    with torch.no_grad():
        torch.testing.assert_close(sae(x), z @ W_dec + b_dec)


def test_to_sae_lens_abstopk_encodes_exactly_like_pam() -> None:
    """The saved ``abstopk`` SAE and PAM's training-time encoder give identical codes."""
    g = torch.Generator().manual_seed(1)
    W_enc, W_dec = torch.randn(8, 16, generator=g), torch.randn(16, 8, generator=g)
    b_enc, b_dec = torch.randn(16, generator=g), torch.randn(8, generator=g)
    sae = to_sae_lens(W_enc, b_enc, W_dec, b_dec, k=3, activation="abstopk")
    assert isinstance(sae, AbsTopKSAE) and sae.cfg.k == 3
    x = torch.randn(50, 8, generator=g)
    pre = x @ W_enc + b_enc
    idx = pre.abs().topk(3).indices
    expected = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    with torch.no_grad():
        z = sae.encode(x)
        assert torch.equal(z, _codes(x, W_enc, b_enc, activation_fn("abstopk", 3)))
        torch.testing.assert_close(z, expected)
        torch.testing.assert_close(sae(x), expected @ W_dec + b_dec)
    assert bool((z < 0).any()) and bool(((z != 0).sum(-1) == 3).all())


def test_memory_mapped_activations_train_like_in_memory_ones(
    sparse_data: CachedActivations, tmp_path
) -> None:
    x = sparse_data.acts[:1024].contiguous()
    path = tmp_path / "acts.bin"
    x.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=x.numel(), dtype=x.dtype).view(x.shape)
    settings = PAMSettings(d_sae=32, k=4, epochs=2, chunk_size=300)
    a, b = (
        train_pam(
            CachedActivations(t, sparse_data.token_ids[:1024], HOOK, 32, 0.0),
            settings,
            progress=False,
        )
        for t in (x, mapped)
    )
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec)
    assert a.history == b.history
