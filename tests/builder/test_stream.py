"""The streaming build on a model: provenance, exclusions, inputs, patience and budgets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import HookedSAETransformer

from itda_lens import (
    build_itda,
    build_itda_from_activations,
)
from tests.helpers import BOS, PAD, SEQ, make_tokens

HOOK = "blocks.1.hook_resid_post"


def test_build_itda_on_a_model(model: HookedSAETransformer) -> None:
    toks = make_tokens(40)
    toks[5, 10:] = PAD
    itda = build_itda(model, toks, HOOK, k=6, cos_threshold=0.8, batch_size=8, progress=False)[HOOK]
    assert itda.cfg.d_sae > 0
    ids = set(itda.atom_token_ids.tolist())
    assert BOS not in ids and PAD not in ids, "BOS and PAD positions are excluded by default"
    # provenance: each atom is the normalised activation at its (sequence, position)
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    seq, pos = itda.atom_labels[:, 0], itda.atom_labels[:, 1]
    torch.testing.assert_close(
        F.normalize(cache[HOOK][seq, pos], dim=1), itda.W_dec, atol=1e-5, rtol=1e-5
    )
    assert torch.equal(toks[seq, pos], itda.atom_token_ids)
    meta = itda.cfg.metadata
    assert (
        meta.hook_name == HOOK
        and meta.hook_layer == 1
        and meta.context_size == SEQ
        and meta.prepend_bos
    )
    record = itda.require_build_record()
    assert record.tokens_seen == 40 * SEQ and record.config["k"] == 6
    assert record.stream.n_sequences == 40 and record.stream.n_rows == 40 * SEQ


def test_exclusion_is_configurable(model: HookedSAETransformer) -> None:
    itda = build_itda(
        model,
        make_tokens(8),
        HOOK,
        k=4,
        cos_threshold=0.95,
        exclude_special_tokens=False,
        progress=False,
    )[HOOK]
    assert BOS in set(itda.atom_token_ids.tolist())


def test_build_is_deterministic_and_multi_hook_shares_one_pass(model: HookedSAETransformer) -> None:
    toks = make_tokens(32)
    hooks = ["blocks.0.hook_resid_post", HOOK]
    both = build_itda(model, toks, hooks, k=5, cos_threshold=0.85, batch_size=8, progress=False)
    assert set(both) == set(hooks)
    alone = build_itda(model, toks, HOOK, k=5, cos_threshold=0.85, batch_size=8, progress=False)[
        HOOK
    ]
    assert torch.equal(both[HOOK].W_dec, alone.W_dec) and torch.equal(
        both[HOOK].atom_labels, alone.atom_labels
    )


def test_unknown_hook_raises_with_suggestion(model: HookedSAETransformer) -> None:
    with pytest.raises(
        ValueError, match=r"no hook point 'blocks\.1\.hook_resid_pots'.*Did you mean"
    ):
        build_itda(model, make_tokens(4), "blocks.1.hook_resid_pots", progress=False)[
            "blocks.1.hook_resid_pots"
        ]


def test_bad_tokens_raise(model: HookedSAETransformer) -> None:
    with pytest.raises(TypeError, match="integer token ids"):
        build_itda(model, torch.randn(4, SEQ), HOOK, progress=False)[HOOK]
    with pytest.raises(ValueError, match=r"\[n_seq, seq_len\]"):
        build_itda(model, torch.arange(10), HOOK, progress=False)[HOOK]
    with pytest.raises(ValueError, match="token ids must lie"):
        build_itda(model, torch.full((2, SEQ), 10_000), HOOK, progress=False)[HOOK]


def test_dataset_inputs(model: HookedSAETransformer, tokenizer) -> None:
    toks = make_tokens(16)
    from_tensor = build_itda(
        model, toks, HOOK, k=4, cos_threshold=0.8, batch_size=4, progress=False
    )[HOOK]
    ds = Dataset.from_dict({"tokens": toks.tolist()})
    from_ds = build_itda(model, ds, HOOK, k=4, cos_threshold=0.8, batch_size=4, progress=False)[
        HOOK
    ]
    assert torch.equal(from_ds.W_dec, from_tensor.W_dec)
    from_iter = build_itda(
        model, iter(toks.split(4)), HOOK, k=4, cos_threshold=0.8, progress=False
    )[HOOK]
    assert torch.equal(from_iter.W_dec, from_tensor.W_dec)
    text = Dataset.from_dict(
        {"text": [" ".join(f"w{(i * 7 + j) % 150}" for j in range(50)) for i in range(12)]}
    )
    from_text = build_itda(
        model, text, HOOK, k=4, cos_threshold=0.8, context_size=SEQ, progress=False
    )[HOOK]
    assert from_text.cfg.metadata.context_size == SEQ and from_text.cfg.metadata.prepend_bos


def test_from_activations_bad_input() -> None:
    with pytest.raises(ValueError, match="no activations"):
        build_itda_from_activations([], progress=False)
    with pytest.raises(ValueError, match="float tensor"):
        build_itda_from_activations([torch.ones(3, 4, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="empty dictionary"):
        build_itda_from_activations([torch.zeros(5, 4)], progress=False)


def test_patience_stops_exactly_and_independently_of_the_batch_size(
    model: HookedSAETransformer,
) -> None:
    toks = make_tokens(64)
    kw = {"k": 12, "cos_threshold": 0.8, "progress": False}
    full = build_itda(model, toks, HOOK, batch_size=4, **kw)[HOOK]
    added_at = (full.atom_labels[:, 0] * SEQ + full.atom_labels[:, 1]).tolist()
    patience = 2 * SEQ
    # the first gap of `patience` tokens without a new atom ends the build there
    gaps = [b - a for a, b in zip(added_at, [*added_at[1:], 64 * SEQ], strict=True)]
    stop_after = next(a for a, gap in zip(added_at, gaps, strict=True) if gap > patience)
    for batch_size in (1, 4, 64):
        early = build_itda(
            model, toks, HOOK, batch_size=batch_size, patience_tokens=patience, **kw
        )[HOOK]
        record = early.require_build_record()
        assert record.stop_reason == "converged"
        assert record.tokens_seen == stop_after + patience + 1
        n = early.cfg.d_sae
        assert torch.equal(early.W_dec, full.W_dec[:n])
        assert added_at[n - 1] == stop_after
    with pytest.raises(ValueError, match="patience_tokens"):
        build_itda(model, toks, HOOK, patience_tokens=0, progress=False)[HOOK]


def test_sequence_batch_size_and_token_budget_do_not_change_the_atoms(
    model: HookedSAETransformer,
) -> None:
    toks = make_tokens(48, seed=5)
    kw = {"k": 8, "cos_threshold": 0.9, "progress": False}
    builds = [build_itda(model, toks, HOOK, batch_size=b, **kw)[HOOK] for b in (1, 7, 48, 100)]
    for other in builds[1:]:
        assert torch.equal(other.W_dec, builds[0].W_dec)
        assert torch.equal(other.atom_labels, builds[0].atom_labels)
    budget = 10 * SEQ + 5  # mid-sequence: the stream is cut at exactly this token
    cut = [
        build_itda(model, toks, HOOK, batch_size=b, max_tokens=budget, **kw)[HOOK] for b in (3, 16)
    ]
    assert torch.equal(cut[0].atom_labels, cut[1].atom_labels)
    assert cut[0].require_build_record().tokens_seen == budget
    labels = builds[0].atom_labels
    before = (labels[:, 0] * SEQ + labels[:, 1]) < budget
    assert torch.equal(cut[0].atom_labels, labels[before])
