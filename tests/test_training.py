"""Comparison SAEs from sae_lens's trainer on cached activations."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE, AbsTopKSAE, MatchingPursuitSAE

from itda_lens.activations import collect_activations
from itda_lens.evals import evaluate
from itda_lens.training import shuffled_batches, train_sae
from tests.helpers import BOS, make_tokens

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def cached(model):
    return collect_activations(model, make_tokens(64), HOOK)


def test_collect_drops_special_positions(model, cached) -> None:
    toks = make_tokens(64)
    assert cached.acts.shape == (int((toks != BOS).sum()), model.cfg.d_model)
    assert (cached.token_ids != BOS).all() and cached.context_size == toks.shape[1]
    _, cache = model.run_with_cache(toks[:1], names_filter=[HOOK])
    torch.testing.assert_close(cached.acts[: toks.shape[1] - 1], cache[HOOK][0, 1:])


def test_shuffled_batches_cover_every_row_each_epoch() -> None:
    acts = torch.arange(10.0).unsqueeze(1)
    it = shuffled_batches(acts, 5)
    epoch = torch.cat([next(it), next(it)]).flatten().sort().values
    assert torch.equal(epoch, torch.arange(10.0))
    with pytest.raises(ValueError, match="at least"):
        next(shuffled_batches(acts, 11))


@pytest.mark.parametrize(("arch", "cls"), [("topk", "TopKSAE"), ("batchtopk", "JumpReLUSAE")])
def test_train_sae_returns_a_loadable_inference_sae(model, cached, arch: str, cls: str) -> None:
    trained = train_sae(
        cached,
        architecture=arch,
        d_sae=64,
        k=4,
        training_tokens=8192,
        batch_size=256,
        model_name="tiny-0",
    )
    sae = trained.sae
    assert isinstance(sae, SAE) and type(sae).__name__ == cls and trained.training_tokens == 8192
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.context_size == 32
    metrics = evaluate(sae, model, make_tokens(16, seed=4))
    assert math.isfinite(metrics["explained_variance"]) and metrics["l0"] > 0


@pytest.mark.parametrize(
    ("arch", "cls"), [("abstopk", AbsTopKSAE), ("matching_pursuit", MatchingPursuitSAE)]
)
def test_new_architectures_train_save_load_and_reconstruct(
    model, cached, tmp_path, arch: str, cls: type[SAE]
) -> None:
    """AbsTopK and matching pursuit through sae_lens's trainer: the inference class sae_lens
    saves, the same codes after a save/load round trip, FVU < 1 on the training data, L0 <= k,
    and sae_lens's evals run on it in the model."""
    k = 4
    trained = train_sae(
        cached,
        architecture=arch,  # type: ignore[arg-type]
        d_sae=64,
        k=k,
        training_tokens=8192,
        batch_size=256,
        lr=1e-2,
        model_name="tiny-0",
    )
    sae = trained.sae
    assert type(sae) is cls and sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.metadata.model_name == "tiny-0" and sae.cfg.normalize_activations == "none"
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is cls
    x = cached.acts
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(loaded.encode(x), z)
        fvu = float(((sae.decode(z) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    l0 = (z != 0).sum(-1)
    assert fvu < 0.8, fvu
    if arch == "matching_pursuit":
        # k greedy steps, never stopped by the residual: up to k latents, non-negative codes
        assert loaded.cfg.max_iterations == k and loaded.cfg.residual_threshold == 0.0
        assert int(l0.max()) <= k and float(l0.float().mean()) > k - 1 and (z >= 0).all()
    else:
        # exactly k signed codes per row, and some of them negative
        assert bool((l0 == k).all()) and bool((z < 0).any())
    metrics = evaluate(loaded, model, make_tokens(16, seed=4))
    assert math.isfinite(metrics["explained_variance"]) and 0 < metrics["l0"] <= k


def test_unknown_architecture_names_the_valid_ones(cached) -> None:
    with pytest.raises(ValueError, match="abstopk, matching_pursuit"):
        train_sae(
            cached,
            architecture="gated",  # type: ignore[arg-type]
            d_sae=8,
            k=2,
            training_tokens=256,
            batch_size=256,
        )


def test_summarise_activations_matches_torch_and_names_bad_rows() -> None:
    from itda_lens.activations import summarise_activations

    x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    s = summarise_activations(x, chunk_size=128)
    torch.testing.assert_close(s.mean, x.double().mean(0))
    torch.testing.assert_close(s.variance, x.double().var(0, unbiased=False))
    assert s.mean_norm == pytest.approx(float(x.double().norm(dim=1).mean()))
    x[700, 3] = math.nan
    with pytest.raises(ValueError, match="row 700"):
        summarise_activations(x, chunk_size=128)
    with pytest.raises(ValueError, match="float tensor"):
        summarise_activations(torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("arch", "cls"), [("standard", "StandardSAE"), ("jumprelu", "JumpReLUSAE")]
)
def test_standard_and_jumprelu_train_save_and_load(cached, tmp_path, arch: str, cls: str) -> None:
    trained = train_sae(
        cached,
        architecture=arch,  # type: ignore[arg-type]
        d_sae=64,
        k=4,
        training_tokens=4096,
        batch_size=256,
        lr=1e-2,
        model_name="tiny-0",
    )
    sae = trained.sae
    assert type(sae).__name__ == cls and sae.cfg.metadata.hook_name == HOOK
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    x = cached.acts
    with torch.no_grad():
        z = loaded.encode(x)
        torch.testing.assert_close(z, sae.encode(x))
        fvu = float(((loaded.decode(z) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 1.0 and float((z != 0).sum(-1).float().mean()) > 0


def test_mp_config_runs_exactly_k_steps() -> None:
    from itda_lens.training import training_config

    cfg = training_config("matching_pursuit", d_in=8, d_sae=16, k=3, device="cpu")
    assert cfg.max_iterations == 3 and cfg.residual_threshold == 0.0
    assert cfg.stop_on_duplicate_support is False


def test_checkpoints_report_inference_saes_along_one_run(cached) -> None:
    """on_checkpoint sees the inference SAE (normalisation folded in) at 0 tokens and at sae_lens's
    evenly spaced checkpoints; the run itself is the one without checkpoints."""
    seen: list[tuple[int, float, SAE]] = []
    kw = {"d_sae": 32, "k": 4, "training_tokens": 2048, "batch_size": 256}
    trained = train_sae(
        cached, checkpoints=3, on_checkpoint=lambda n, t, s: seen.append((n, t, s)), **kw
    )
    plain = train_sae(cached, **kw)
    assert [n for n, _, _ in seen] == [0, 768, 1280, 1792]
    seconds = [t for _, t, _ in seen]
    assert seconds == sorted(seconds) and seconds[-1] <= trained.train_seconds
    assert all(s.cfg.normalize_activations == "none" for _, _, s in seen)
    assert all(s.cfg.metadata.hook_name == HOOK for _, _, s in seen)
    torch.testing.assert_close(trained.sae.W_dec, plain.sae.W_dec)
