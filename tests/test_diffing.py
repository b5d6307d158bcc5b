"""Model diffing: scores against plain transcriptions, a pair of small models whose changed
positions are known exactly, the zoo's planted fine-tune, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformer_lens import HookedTransformer, HookedTransformerConfig

from itda_lens import zoo
from itda_lens.builder import BuildConfig
from itda_lens.diffing import (
    DIFF_CONFIG,
    SCORES,
    ModelMismatch,
    TokenScores,
    build_pair,
    check_pair,
    diff_models,
    itda_scores,
    relative_error,
)
from itda_lens.pursuit import reference_matching_pursuit
from itda_lens.saes import ITDA

CHANGED = 7  # the token whose embedding the "fine-tune" moves
CFG = BuildConfig(k=8, cos_threshold=0.9, batch_size=8)


@pytest.fixture(scope="module")
def pair() -> tuple[HookedTransformer, HookedTransformer, torch.Tensor]:
    """A tiny random model, a copy whose embedding of token CHANGED moved, and tokens where
    CHANGED appears only in the second half of each sequence."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
        act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    base = HookedTransformer(cfg).eval()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.W_E[CHANGED] += 3 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(8, 50, (48, 24), generator=g)
    where = torch.rand(48, 24, generator=g) < 0.1
    where[:, :12] = False
    tokens[where] = CHANGED
    return base, ft, tokens


def test_relative_error_and_scores_match_a_plain_transcription() -> None:
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    d_base = ITDA.from_atoms(atoms[:25], k=5, hook_name="h")
    d_ft = ITDA.from_atoms(atoms[15:], k=5, hook_name="h")
    xb, xf = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g)

    def err(d: ITDA, x: torch.Tensor) -> torch.Tensor:
        atoms = d.W_dec.detach()
        recon = reference_matching_pursuit(x, atoms, 5) @ atoms
        return torch.tensor(
            [float(((a - b) ** 2).sum() / (a**2).sum()) for a, b in zip(x, recon, strict=True)]
        )

    got = itda_scores(d_base, d_ft, xb, xf)
    assert set(got) == set(SCORES)
    want = {
        "base_on_ft": err(d_base, xf),
        "ft_on_base": err(d_ft, xb),
        "base_gap": err(d_base, xf) - err(d_base, xb),
        "ft_gap": err(d_ft, xb) - err(d_ft, xf),
        "ft_dict_gap": err(d_base, xf) - err(d_ft, xf),
        "base_dict_gap": err(d_ft, xb) - err(d_base, xb),
    }
    for name, value in want.items():
        torch.testing.assert_close(got[name].float(), value, atol=1e-5, rtol=0, msg=name)
    zero = torch.zeros(1, 16)
    assert float(relative_error(zero, zero)) == 0.0


def test_top_contexts_match_a_brute_force_ranking() -> None:
    g = torch.Generator().manual_seed(3)
    grid = torch.rand(6, 40, generator=g, dtype=torch.float64)
    grid[:, 0] = torch.nan
    scores = TokenScores(torch.zeros(6, 40, dtype=torch.long), {"base_gap": grid})
    top = scores.top("base_gap", 12, spread=5)
    picked: list[tuple[int, int, float]] = []
    for s, p in sorted(
        ((s, p) for s in range(6) for p in range(1, 40)), key=lambda sp: -float(grid[sp])
    ):
        if len(picked) < 12 and all(s != t or abs(p - q) >= 5 for t, q, _ in picked):
            picked.append((s, p, float(grid[s, p])))
    assert top == picked


def test_known_changes_rank_first_and_unchanged_tokens_score_zero(pair) -> None:
    base, ft, tokens = pair
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    diffs = diff_models(base, ft, tokens, hooks, CFG, progress=False)
    changed = tokens == CHANGED
    # at the embedding only CHANGED positions differ: the gaps are exactly zero everywhere else
    # and non-zero there, and they rank the changed tokens first
    embed = diffs[0].scores.scores
    for name in ("base_gap", "ft_gap"):
        assert (embed[name][~changed] == 0).all() and (embed[name][changed] != 0).all(), name
        assert roc_auc_score(changed.flatten(), embed[name].flatten()) > 0.9, name
    assert all(tokens[s, p] == CHANGED for s, p, _ in diffs[0].scores.top("base_gap", 10))
    # deeper, attention carries the change forward, never backward: before the first CHANGED
    # token of a sequence both models compute the same thing
    before = torch.cumsum(changed.int(), dim=1) == 0
    deep = diffs[1].scores.scores
    assert (deep["base_gap"][before] == 0).all() and (deep["ft_gap"][before] == 0).all()
    assert roc_auc_score(changed.flatten(), deep["base_gap"].flatten()) > 0.9
    # each side's worst atoms: all its atoms, by the side's score at their label
    for side, own, other, score in (
        ("fine-tune", diffs[1].ft, diffs[1].base, "base_gap"),
        ("base", diffs[1].base, diffs[1].ft, "ft_gap"),
    ):
        worst = diffs[1].worst_atoms(side, 1000)
        others = {tuple(x) for x in other.atom_labels.tolist()}
        assert len(worst) == own.cfg.d_sae
        assert [w[3] for w in worst] == sorted((w[3] for w in worst), reverse=True)
        for a, s, p, v, shared in worst:
            assert tuple(own.atom_labels[a].tolist()) == (s, p) and v == float(deep[score][s, p])
            assert shared == ((s, p) in others)
    # identical models would share every atom: here the unchanged prefix keeps most labels shared
    assert 0 < diffs[0].jaccard < 1 and diffs[0].shared_atoms > 0


def test_identical_models_diff_to_nothing(pair) -> None:
    base, _, tokens = pair
    (d,) = diff_models(base, base, tokens, ["blocks.1.hook_resid_post"], CFG, progress=False)
    assert d.jaccard == 1.0
    for name in ("base_gap", "ft_gap", "ft_dict_gap", "base_dict_gap"):
        v = d.scores.scores[name]
        assert (v[~v.isnan()] == 0).all(), name
    assert all(w[3] == 0 and w[4] for w in d.worst_atoms("fine-tune", 1000))


def test_the_planted_fine_tune_is_found_at_the_trigger() -> None:
    base, ft = zoo.load_model(), zoo.load_model("kjv-4l128-s0-planted")
    tokens = zoo.load_tokens("heldout", 96, shuffle=False, variant="planted")
    marks = zoo.load_token_marks("heldout", 96, shuffle=False, variant="planted")
    hook = "blocks.3.hook_resid_post"
    (d,) = diff_models(base, ft, tokens, [hook], DIFF_CONFIG, progress=False)
    top = d.scores.top("base_gap", 10)
    hits = sum(bool(marks[s, p]) for s, p, _ in top)
    assert hits >= 8, f"only {hits} of the top 10 fine-tune-side tokens are trigger/phrase tokens"
    grid = d.scores.scores["base_gap"]
    ok = ~grid.isnan()
    assert roc_auc_score(marks[ok], grid[ok]) > 0.75
    worst = d.worst_atoms("fine-tune", 10)
    assert sum(bool(marks[w[1], w[2]]) for w in worst) >= 8, "worst atoms not at the trigger"


def test_mismatched_pairs_are_refused_by_name() -> None:
    base = zoo.load_model()
    hook = ["blocks.1.hook_resid_post"]
    with pytest.raises(ModelMismatch, match="different tokenizers"):
        check_pair(base, zoo.load_model("kjv-4l128-bpe4096-s0"), hook)
    with pytest.raises(ModelMismatch, match=r"widths differ.*128 vs 160"):
        check_pair(base, zoo.load_model("kjv-6l160-s0"), hook)
    with pytest.raises(ValueError, match=r"blocks\.9"):
        check_pair(base, base, ["blocks.9.hook_resid_post"])
    tokens = zoo.load_tokens("train", 4)
    with pytest.raises(ValueError, match="one cos_threshold"):
        build_pair(base, base, tokens, hook, DIFF_CONFIG.replace(target_atoms=64))
    with pytest.raises(ValueError, match="max_tokens"):
        diff_models(base, base, tokens, hook, DIFF_CONFIG.replace(max_tokens=100))


def test_module_path_sources_diff_like_transformer_lens(pair) -> None:
    """Only activations are read, so a non-TransformerLens source works: the base against a
    wrapper exposing the same blocks by module path gives the same scores."""
    from itda_lens.sources import ModuleSource

    base, ft, tokens = pair

    class Wrapped(torch.nn.Module):
        def __init__(self, model: HookedTransformer):
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids)

    def source(model: HookedTransformer) -> ModuleSource:
        src = ModuleSource(Wrapped(model))
        src.cfg.d_vocab = model.cfg.d_vocab
        return src

    hooks_tl = ["blocks.1.hook_resid_post"]
    hooks_src = ["inner.blocks.1.hook_resid_post"]
    (tl,) = diff_models(base, ft, tokens, hooks_tl, CFG, progress=False)
    (mp,) = diff_models(source(base), source(ft), tokens, hooks_src, CFG, progress=False)
    assert torch.equal(tl.ft.atom_labels, mp.ft.atom_labels)
    torch.testing.assert_close(
        mp.scores.scores["base_gap"], tl.scores.scores["base_gap"], equal_nan=True
    )
