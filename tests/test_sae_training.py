"""Comparison SAEs from sae_lens's trainer on cached activations."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE

from itda_lens.evals import evaluate
from itda_lens.sae_training import collect_activations, shuffled_batches, train_sae
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


def test_summarise_activations_matches_torch_and_names_bad_rows() -> None:
    from itda_lens.sae_training import summarise_activations

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
