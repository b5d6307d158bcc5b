"""Sizing by target (threshold search) and the energy refinement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_lens import HookedSAETransformer

from itda_lens import (
    build_itda,
    build_itda_from_activations,
)
from tests.builder.helpers import (
    anisotropic,
    chunks,
)
from tests.helpers import make_tokens

HOOK = "blocks.1.hook_resid_post"


def test_target_atoms_finds_the_threshold() -> None:
    acts = anisotropic(3000, 32, seed=4)
    itda = build_itda_from_activations(chunks(acts, 256), k=6, target_atoms=150, progress=False)
    search = itda.require_build_record().search
    assert search is not None
    assert abs(itda.cfg.d_sae - 150) <= 3 and search.atoms_on_sample == itda.cfg.d_sae
    again = build_itda_from_activations([acts], k=6, cos_threshold=search.threshold, progress=False)
    assert torch.equal(again.atom_labels, itda.atom_labels)
    record = itda.require_build_record()
    assert record.cos_threshold == search.threshold and record.config["target_atoms"] == 150
    with pytest.raises(ValueError, match="exceeds"):
        build_itda_from_activations([acts[:100]], k=6, target_atoms=150, progress=False)
    redundant = acts[:5].repeat(100, 1) * torch.rand(500, 1)  # 5 directions, rescaled
    with pytest.raises(ValueError, match="too redundant"):
        build_itda_from_activations([redundant], k=2, target_atoms=50, progress=False)


def test_target_atoms_and_refinement_on_a_model(model: HookedSAETransformer) -> None:
    toks = make_tokens(48, seed=7)
    kw = {"k": 4, "progress": False, "batch_size": 8}
    sized = build_itda(model, toks, HOOK, target_atoms=120, **kw)[HOOK]
    assert abs(sized.cfg.d_sae - 120) <= 2  # target_tolerance 2%
    search = sized.require_build_record().search
    assert search is not None and search.sample_tokens == toks.numel() - 48
    refined = build_itda(model, toks, HOOK, target_atoms=120, refine="energy", **kw)[HOOK]
    assert refined.cfg.d_sae == 120 and abs(refined.cfg.metadata.refined["from_atoms"] - 360) <= 7
    # every refined atom is still a real activation at its recorded position
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    seq, pos = refined.atom_labels[:, 0], refined.atom_labels[:, 1]
    torch.testing.assert_close(F.normalize(cache[HOOK][seq, pos], dim=1), refined.W_dec)


def test_target_atoms_holds_on_a_stream_longer_than_the_sample() -> None:
    """At the sample's threshold a longer stream keeps adding atoms; the sized build stops at the
    target instead (the sample alone is built exactly as before)."""
    acts = anisotropic(6000, 32, seed=7)
    kw = {"k": 6, "target_atoms": 120, "target_sample_tokens": 1500, "progress": False}
    long = build_itda_from_activations(chunks(acts, 500), **kw)
    record = long.require_build_record()
    assert long.cfg.d_sae == 120 and record.stop_reason == "full"
    at_threshold = build_itda_from_activations(
        chunks(acts, 500), k=6, cos_threshold=record.cos_threshold, progress=False
    )
    assert at_threshold.cfg.d_sae > 130, "without the cap the dictionary would have kept growing"
    assert torch.equal(at_threshold.atom_labels[:120], long.atom_labels)
    sample_only = build_itda_from_activations(chunks(acts[:1500], 500), **kw)
    assert sample_only.require_build_record().stop_reason is None
    assert abs(sample_only.cfg.d_sae - 120) <= 3
