"""The greedy builder: the add rule, dedup, exclusions, determinism, checkpoints and resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import HookedSAETransformer

from itda_lens import (
    ITDA,
    BuildSettings,
    ITDABuilder,
    build_itda,
    build_itda_from_activations,
    cos_threshold_from_tau,
)
from itda_lens.builder import ActivationBatch
from itda_lens.pursuit import decode, matching_pursuit
from tests.helpers import BOS, PAD, SEQ, make_tokens

HOOK = "blocks.1.hook_resid_post"


def batch(acts: torch.Tensor, eligible: torch.Tensor | None = None) -> ActivationBatch:
    n = acts.shape[0]
    labels = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
    return ActivationBatch(
        acts,
        labels,
        torch.arange(n),
        torch.ones(n, dtype=torch.bool) if eligible is None else eligible,
    )


def test_add_rule_and_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    first = torch.randn(50, 8, generator=g, dtype=torch.float64)
    b = ITDABuilder(8, BuildSettings(k=3, cos_threshold=0.9), dtype=torch.float64)
    b.update(batch(first))
    atoms = b.store.atoms.clone()
    second = torch.randn(40, 8, generator=g, dtype=torch.float64)
    b.update(batch(second))
    # every activation added in the second batch was poorly reconstructed by the first batch's atoms,
    # and every one left out was reconstructed above the threshold (or is a near-duplicate of one added)
    code = matching_pursuit(second, atoms, 3)
    cos = F.cosine_similarity(second, decode(code, atoms), dim=1)
    added = b.store.atoms[len(atoms) :]
    for i, x in enumerate(second):
        is_atom = bool((F.cosine_similarity(added, x[None], dim=1) > 1 - 1e-12).any())
        if cos[i] >= 0.9:
            assert not is_atom
    assert len(added) > 0 and len(added) <= int((cos < 0.9).sum())


def test_within_batch_duplicates_are_not_all_added() -> None:
    x = torch.randn(1, 16).repeat(20, 1) * torch.linspace(1, 3, 20)[:, None]
    b = ITDABuilder(16, BuildSettings(k=4, cos_threshold=0.8))
    b.update(batch(x))
    assert len(b.store) == 1
    # greedy packing: no two atoms accepted from one batch have |cos| >= threshold
    y = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    b2 = ITDABuilder(16, BuildSettings(k=4, cos_threshold=0.5))
    b2.update(batch(y))
    sims = (b2.store.atoms @ b2.store.atoms.T).abs() - torch.eye(len(b2.store))
    assert sims.max() < 0.5


def test_max_atoms_caps_and_stops_scoring() -> None:
    b = ITDABuilder(8, BuildSettings(k=2, cos_threshold=0.99, max_atoms=7))
    b.update(batch(torch.randn(100, 8)))
    assert len(b.store) == 7 and b.full
    assert b.update(batch(torch.randn(100, 8))) == 0 and len(b.store) == 7


def test_zero_vectors_and_excluded_rows_never_become_atoms() -> None:
    x = torch.randn(10, 4)
    x[3] = 0
    eligible = torch.ones(10, dtype=torch.bool)
    eligible[5] = False
    b = ITDABuilder(4, BuildSettings(k=2, cos_threshold=1.0))
    b.update(batch(x, eligible))
    kept = set(b.store.token_ids.tolist())
    assert 3 not in kept and 5 not in kept and len(kept) > 0


def test_nan_activations_raise() -> None:
    b = ITDABuilder(4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        b.update(batch(torch.full((3, 4), float("nan"))))
    with pytest.raises(ValueError, match="d_in mismatch"):
        b.update(batch(torch.randn(3, 5)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"cos_threshold": 0.0}, "cos_threshold"),
        ({"cos_threshold": 1.5}, "cos_threshold"),
        ({"max_atoms": 0}, "max_atoms"),
        ({"encoder": "ista"}, "encoder"),
    ],
)
def test_impossible_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BuildSettings(**kwargs)


def test_tau_conversion() -> None:
    # reference: (2 - 2 cos) / d > tau  <=>  cos < 1 - tau d / 2
    assert cos_threshold_from_tau(0.0004, 768) == pytest.approx(0.8464)
    with pytest.raises(ValueError, match="never add"):
        cos_threshold_from_tau(0.1, 512)


def test_build_itda_on_a_model(model: HookedSAETransformer) -> None:
    toks = make_tokens(40)
    toks[5, 10:] = PAD
    itda = build_itda(model, toks, HOOK, k=6, cos_threshold=0.8, batch_size=8, progress=False)
    assert isinstance(itda, ITDA) and itda.cfg.d_sae > 0
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
    assert meta.itda_builder["tokens_seen"] == 40 * SEQ and meta.itda_builder["k"] == 6
    assert meta.token_stream["n_sequences"] == 40


def test_exclusion_is_configurable(model: HookedSAETransformer) -> None:
    itda = build_itda(
        model, make_tokens(8), HOOK, k=4, cos_threshold=0.95, exclude_token_ids=None, progress=False
    )
    assert BOS in set(itda.atom_token_ids.tolist())


def test_build_is_deterministic_and_multi_hook_shares_one_pass(model: HookedSAETransformer) -> None:
    toks = make_tokens(32)
    hooks = ["blocks.0.hook_resid_post", HOOK]
    both = build_itda(model, toks, hooks, k=5, cos_threshold=0.85, batch_size=8, progress=False)
    assert set(both) == set(hooks)
    alone = build_itda(model, toks, HOOK, k=5, cos_threshold=0.85, batch_size=8, progress=False)
    assert torch.equal(both[HOOK].W_dec, alone.W_dec) and torch.equal(
        both[HOOK].atom_labels, alone.atom_labels
    )


def test_unknown_hook_raises_with_suggestion(model: HookedSAETransformer) -> None:
    with pytest.raises(
        ValueError, match=r"no hook point 'blocks\.1\.hook_resid_pots'.*Did you mean"
    ):
        build_itda(model, make_tokens(4), "blocks.1.hook_resid_pots", progress=False)


def test_bad_tokens_raise(model: HookedSAETransformer) -> None:
    with pytest.raises(TypeError, match="integer token ids"):
        build_itda(model, torch.randn(4, SEQ), HOOK, progress=False)
    with pytest.raises(ValueError, match=r"\[n_seq, seq_len\]"):
        build_itda(model, torch.arange(10), HOOK, progress=False)
    with pytest.raises(ValueError, match="token ids must lie"):
        build_itda(model, torch.full((2, SEQ), 10_000), HOOK, progress=False)


def test_dataset_inputs(model: HookedSAETransformer, tokenizer) -> None:
    toks = make_tokens(16)
    from_tensor = build_itda(
        model, toks, HOOK, k=4, cos_threshold=0.8, batch_size=4, progress=False
    )
    ds = Dataset.from_dict({"tokens": toks.tolist()})
    from_ds = build_itda(model, ds, HOOK, k=4, cos_threshold=0.8, batch_size=4, progress=False)
    assert torch.equal(from_ds.W_dec, from_tensor.W_dec)
    from_iter = build_itda(model, iter(toks.split(4)), HOOK, k=4, cos_threshold=0.8, progress=False)
    assert torch.equal(from_iter.W_dec, from_tensor.W_dec)
    text = Dataset.from_dict(
        {"text": [" ".join(f"w{(i * 7 + j) % 150}" for j in range(50)) for i in range(12)]}
    )
    from_text = build_itda(
        model, text, HOOK, k=4, cos_threshold=0.8, context_size=SEQ, progress=False
    )
    assert from_text.cfg.metadata.context_size == SEQ and from_text.cfg.metadata.prepend_bos


class Crash(Exception):
    pass


def crashing(batches: list[torch.Tensor], after: int) -> Iterator[torch.Tensor]:
    for i, b in enumerate(batches):
        if i == after:
            raise Crash
        yield b


def test_resume_after_interruption_gives_the_same_dictionary(
    model: HookedSAETransformer, tmp_path: Path
) -> None:
    batches = list(make_tokens(64, seed=3).split(4))
    kw = {"k": 6, "cos_threshold": 0.9, "progress": False}
    whole = build_itda(model, iter(batches), HOOK, **kw)
    with pytest.raises(Crash):
        build_itda(
            model, crashing(batches, 9), HOOK, checkpoint_dir=tmp_path, checkpoint_every=2, **kw
        )
    resumed = build_itda(
        model, iter(batches), HOOK, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **kw
    )
    assert torch.equal(resumed.W_dec, whole.W_dec)
    assert torch.equal(resumed.atom_labels, whole.atom_labels)
    assert (
        resumed.cfg.metadata.itda_builder["tokens_seen"]
        == whole.cfg.metadata.itda_builder["tokens_seen"]
    )
    assert resumed.cfg.metadata.token_stream["sha256"] == whole.cfg.metadata.token_stream["sha256"]


def test_checkpoint_guards(model: HookedSAETransformer, tmp_path: Path) -> None:
    toks = make_tokens(16)
    kw = {
        "k": 4,
        "cos_threshold": 0.8,
        "batch_size": 4,
        "progress": False,
        "checkpoint_dir": tmp_path,
    }
    build_itda(model, toks, HOOK, **kw)
    with pytest.raises(FileExistsError, match="resume=True"):
        build_itda(model, toks, HOOK, **kw)
    with pytest.raises(ValueError, match="other settings"):
        build_itda(model, toks, HOOK, resume=True, **{**kw, "k": 5})
    finished = build_itda(model, toks, HOOK, resume=True, **kw)
    assert finished.cfg.d_sae > 0
    other = tmp_path / "other"
    with pytest.raises(Crash):
        build_itda(
            model,
            crashing(list(toks.split(4)), 3),
            HOOK,
            **{**kw, "checkpoint_dir": other, "checkpoint_every": 1},
        )
    with pytest.raises(ValueError, match="input differs"):
        build_itda(
            model, make_tokens(16, seed=99), HOOK, resume=True, **{**kw, "checkpoint_dir": other}
        )
    (other / "itda_checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt build checkpoint"):
        build_itda(model, toks, HOOK, resume=True, **{**kw, "checkpoint_dir": other})


def test_from_activations_with_labels_and_resume(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(30, 8, generator=g) for _ in range(6)]
    items = [
        (c, torch.stack([torch.full((30,), i), torch.arange(30)], 1)) for i, c in enumerate(chunks)
    ]
    whole = build_itda_from_activations(
        items,
        k=3,
        cos_threshold=0.9,
        progress=False,
        metadata={"hook_name": "blocks.3.hook_resid_post"},
    )
    assert whole.cfg.metadata.hook_layer == 3
    assert set(whole.atom_labels[:, 0].tolist()) <= set(range(6))
    with pytest.raises(Crash):
        build_itda_from_activations(
            crashing(items, 4),
            k=3,
            cos_threshold=0.9,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    resumed = build_itda_from_activations(
        items, k=3, cos_threshold=0.9, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert torch.equal(resumed.W_dec, whole.W_dec)
    unlabeled = build_itda_from_activations(chunks, k=3, cos_threshold=0.9, progress=False)
    assert (unlabeled.atom_labels[:, 1] == -1).all() and torch.equal(unlabeled.W_dec, whole.W_dec)


def test_from_activations_bad_input() -> None:
    with pytest.raises(ValueError, match="no activations"):
        build_itda_from_activations([], progress=False)
    with pytest.raises(ValueError, match="float tensor"):
        build_itda_from_activations([torch.ones(3, 4, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="empty dictionary"):
        build_itda_from_activations([torch.zeros(5, 4)], progress=False)


def test_patience_stops_a_converged_build(model: HookedSAETransformer) -> None:
    toks = make_tokens(64)
    full = build_itda(model, toks, HOOK, k=12, cos_threshold=0.8, batch_size=4, progress=False)
    early = build_itda(
        model,
        toks,
        HOOK,
        k=12,
        cos_threshold=0.8,
        batch_size=4,
        patience_tokens=3 * 4 * SEQ,
        progress=False,
    )
    growth = full.cfg.metadata.itda_builder["growth"]
    last_add = (
        max(g[0] for g, prev in zip(growth[1:], growth, strict=False) if g[1] > prev[1])
        if len(growth) > 2
        else growth[0][0]
    )
    seen = early.cfg.metadata.itda_builder["tokens_seen"]
    assert seen <= last_add + 3 * 4 * SEQ and seen < full.cfg.metadata.itda_builder["tokens_seen"]
    assert (
        torch.equal(early.W_dec, full.W_dec[: early.cfg.d_sae])
        and early.cfg.d_sae == full.cfg.d_sae
    )
    with pytest.raises(ValueError, match="patience_tokens"):
        build_itda(model, toks, HOOK, patience_tokens=0, progress=False)
