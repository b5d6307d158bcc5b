"""transcoder_scores on an ITDA transcoder of a zoo model's layer-1 MLP: each number against the
model read directly, the model restored afterwards, and bad input refused."""

from __future__ import annotations

import pytest
import torch
from sae_lens import HookedSAETransformer

from itda_lens import ITDA, ITDATranscoder, build_itda_transcoder, zoo
from itda_lens.analysis import fvu
from itda_lens.evals import transcoder_scores

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
SPECIAL = [0, 1, 2]  # the zoo tokenizer's BOS, EOS and PAD


@pytest.fixture(scope="module")
def lm() -> HookedSAETransformer:
    return zoo.load_model("kjv-4l128-s0")


@pytest.fixture(scope="module")
def built(lm: HookedSAETransformer) -> ITDATranscoder:
    tokens = zoo.load_tokens("train", 16)
    return build_itda_transcoder(
        lm, tokens, HOOK_IN, HOOK_OUT, k=16, cos_threshold=0.9, progress=False
    )


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return zoo.load_tokens("heldout", 8)


@pytest.fixture(scope="module")
def scores(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> dict[str, float]:
    return transcoder_scores(built, lm, heldout, batch_size=3)


def test_losses_bracket_the_spliced_one_and_the_error_term_gives_the_clean_one(
    lm: HookedSAETransformer, heldout: torch.Tensor, scores: dict[str, float]
) -> None:
    clean = scores["ce_loss_without_sae"]
    assert clean == pytest.approx(lm(heldout, return_type="loss").item(), abs=1e-5)
    assert abs(scores["ce_loss_with_error_term"] - clean) < 1e-4
    assert clean < scores["ce_loss_with_sae"] < scores["ce_loss_with_ablation"]
    recovered = (scores["ce_loss_with_ablation"] - scores["ce_loss_with_sae"]) / (
        scores["ce_loss_with_ablation"] - clean
    )
    assert 0 < scores["ce_loss_score"] <= 1
    assert scores["ce_loss_score"] == pytest.approx(recovered, rel=1e-12)


def test_ablation_zeroes_the_output_hook_at_the_scored_tokens_only(
    lm: HookedSAETransformer, heldout: torch.Tensor, scores: dict[str, float]
) -> None:
    special = torch.isin(heldout, torch.tensor(SPECIAL))
    assert special[:, 0].all() and not special.all()

    def zero(act: torch.Tensor, hook: object) -> torch.Tensor:
        return torch.where(special[..., None], act, torch.zeros_like(act))

    want = lm.run_with_hooks(heldout, return_type="loss", fwd_hooks=[(HOOK_OUT, zero)]).item()
    assert scores["ce_loss_with_ablation"] == pytest.approx(want, abs=1e-5)


def test_output_fvu_l0_and_dead_latents_are_read_at_the_non_special_tokens(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor, scores: dict[str, float]
) -> None:
    _, cache = lm.run_with_cache(heldout, names_filter=[HOOK_IN, HOOK_OUT])
    keep = ~torch.isin(heldout, torch.tensor(SPECIAL))
    x, y = cache[HOOK_IN][keep], cache[HOOK_OUT][keep]
    codes = built.encode(x)
    assert scores["n_tokens"] == keep.sum().item() < heldout.numel()
    assert scores["fvu"] == pytest.approx(fvu(y, built.decode(codes)), rel=1e-5)
    assert 0 <= scores["fvu"] < 1
    assert scores["l0"] == pytest.approx((codes != 0).sum(-1).float().mean().item(), rel=1e-6)
    assert 0 < scores["l0"] <= built.cfg.k
    dead = 1 - (codes != 0).any(0).float().mean().item()
    assert scores["dead_fraction"] == pytest.approx(dead, abs=1e-9)
    assert 0 <= scores["dead_fraction"] < 1


def test_the_model_is_restored(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    before = lm(heldout[:2])
    everywhere = transcoder_scores(built, lm, heldout[:2], exclude_token_ids=[])
    assert everywhere["n_tokens"] == heldout[:2].numel()  # BOS spliced and scored too
    assert lm.acts_to_saes == {}
    torch.testing.assert_close(lm(heldout[:2]), before, atol=0, rtol=0)


def test_bad_input_is_refused(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    itda = ITDA.from_atoms(built.W_in, k=4, hook_name=HOOK_IN)
    with pytest.raises(ValueError, match="needs a transcoder"):
        transcoder_scores(itda, lm, heldout)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="splices through HookedSAETransformer"):
        transcoder_scores(built, object(), heldout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is scored"):
        transcoder_scores(built, lm, heldout[:, :1].repeat(1, 4))  # BOS only
    with pytest.raises(ValueError, match=r"seq_len >= 2"):
        transcoder_scores(built, lm, heldout[0])
    lm.add_sae(built)
    try:
        with pytest.raises(ValueError, match="reset_saes"):
            transcoder_scores(built, lm, heldout)
    finally:
        lm.reset_saes()


def test_evaluate_all_scores_a_transcoder_and_the_sae_evals_refuse_one(
    lm: HookedSAETransformer, built: ITDATranscoder, heldout: torch.Tensor
) -> None:
    """evaluate_all gives a transcoder transcoder_scores (not run_evals at its input hook);
    run_evals and SAEBench's core eval, which score one hook's reconstruction, refuse it."""
    from itda_lens.evals import evaluate, evaluate_all, saebench_core

    result = evaluate_all(built, lm, heldout)
    assert set(result) == {"transcoder_scores"}
    assert result["transcoder_scores"] == pytest.approx(
        transcoder_scores(built, lm, heldout), rel=1e-6, abs=1e-9
    )
    for run in (evaluate, saebench_core):
        with pytest.raises(ValueError, match=r"is a transcoder .*transcoder_scores"):
            run(built, lm, heldout)
    with pytest.raises(ValueError, match=r"core eval \(core=True\)"):
        evaluate_all(built, lm, heldout, core=True)
    assert lm.acts_to_saes == {}
