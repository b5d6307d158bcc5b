"""The greedy builder: the add rule, dedup, exclusions, determinism, checkpoints and resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sae_lens import HookedSAETransformer
from sklearn.linear_model import orthogonal_mp_gram

from itda_lens import (
    ITDA,
    BuildConfig,
    ITDABuilder,
    build_itda,
    build_itda_from_activations,
    cos_threshold_from_tau,
)
from itda_lens.builder import ActivationBatch
from itda_lens.pursuit import reference_matching_pursuit
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


def sequential_transcription(
    acts: torch.Tensor, k: int, threshold: float, encoder: str
) -> list[int]:
    """The rule read literally: one activation at a time, pursued over every atom before it
    (MP: the paper's Algorithm 2; OMP: scikit-learn), added iff cos(x, x_hat) < threshold."""
    atoms: list[torch.Tensor] = []
    kept = []
    for i, x in enumerate(acts.double()):
        if x.norm() == 0:
            continue
        if atoms:
            a = torch.stack(atoms)
            if encoder == "mp":
                recon = reference_matching_pursuit(x[None], a, k) @ a
            else:
                coef = orthogonal_mp_gram(
                    (a @ a.T).numpy(), (a @ x).numpy(), n_nonzero_coefs=min(k, len(a))
                )
                recon = torch.as_tensor(np.asarray(coef))[None] @ a
            if F.cosine_similarity(x[None], recon, dim=1, eps=1e-30).item() >= threshold:
                continue
        atoms.append(x / x.norm())
        kept.append(i)
    return kept


def anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    return (torch.randn(n, d, generator=g) * torch.logspace(0, -1, d)) @ basis


def chunks(acts: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [acts[s : s + size] for s in range(0, len(acts), size)]


@pytest.mark.parametrize("encoder", ["mp", "omp"])
def test_exact_rule_is_the_sequential_rule(encoder: str) -> None:
    acts = anisotropic(900, 24)
    acts[100] = 0  # zero vectors never become atoms
    acts[200] = 3 * acts[150]  # a rescaled copy is reconstructed exactly
    expected = sequential_transcription(acts, 6, 0.9, encoder)
    itda = build_itda_from_activations(
        chunks(acts, 64), k=6, cos_threshold=0.9, encoder=encoder, progress=False
    )
    assert itda.atom_labels[:, 0].tolist() == expected
    assert len(expected) > 20, "the test should exercise many additions"


@pytest.mark.parametrize("encoder", ["mp", "omp"])
def test_dictionary_does_not_depend_on_the_batch_size(encoder: str) -> None:
    acts = anisotropic(1500, 32, seed=1)
    builds = [
        build_itda_from_activations(
            chunks(acts, size), k=8, cos_threshold=0.9, encoder=encoder, progress=False
        )
        for size in (1, 7, 64, 4096)
    ]
    for other in builds[1:]:
        assert torch.equal(other.W_dec, builds[0].W_dec)
        assert torch.equal(other.atom_labels, builds[0].atom_labels)
    # the reference code's batch rule does depend on it (that is why it is not the default)
    by_batch = [
        build_itda_from_activations(
            chunks(acts, size),
            k=8,
            cos_threshold=0.9,
            encoder=encoder,
            add_rule="batch",
            progress=False,
        ).cfg.d_sae
        for size in (1, 1500)
    ]
    assert by_batch[0] == builds[0].cfg.d_sae and by_batch[1] > 2 * by_batch[0]


def test_every_atom_was_poorly_reconstructed_when_added() -> None:
    acts = anisotropic(400, 16, seed=2)
    itda = build_itda_from_activations([acts], k=3, cos_threshold=0.9, progress=False)
    rows = itda.atom_labels[:, 0].tolist()
    atoms = F.normalize(acts.double(), dim=1)
    for n, row in enumerate(rows):
        if n == 0:
            continue
        recon = reference_matching_pursuit(acts[row : row + 1].double(), atoms[rows[:n]], 3)
        recon = recon @ atoms[rows[:n]]
        assert F.cosine_similarity(acts[row : row + 1].double(), recon).item() < 0.9
    # and every other activation was reconstructed above the threshold by the atoms before it
    for row in sorted(set(range(400)) - set(rows)):
        before = [r for r in rows if r < row]
        recon = reference_matching_pursuit(acts[row : row + 1].double(), atoms[before], 3)
        cos = F.cosine_similarity(acts[row : row + 1].double(), recon @ atoms[before]).item()
        assert cos >= 0.9


def test_batch_rule_skips_near_duplicates_within_a_batch() -> None:
    x = torch.randn(1, 16).repeat(20, 1) * torch.linspace(1, 3, 20)[:, None]
    b = ITDABuilder(16, BuildConfig(k=4, cos_threshold=0.8, add_rule="batch"))
    b.update(batch(x))
    assert len(b.store) == 1
    # greedy packing: no two atoms accepted from one batch have |cos| >= threshold
    y = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    b2 = ITDABuilder(16, BuildConfig(k=4, cos_threshold=0.5, add_rule="batch"))
    b2.update(batch(y))
    sims = (b2.store.atoms @ b2.store.atoms.T).abs() - torch.eye(len(b2.store))
    assert sims.max() < 0.5


@pytest.mark.parametrize("rule", ["exact", "batch"])
def test_max_atoms_caps_and_stops_reading(rule: str) -> None:
    b = ITDABuilder(8, BuildConfig(k=2, cos_threshold=0.99, max_atoms=7, add_rule=rule))
    b.update(batch(torch.randn(100, 8)))
    assert len(b.store) == 7 and b.full and b.stop_reason == "full"
    assert b.tokens_seen == b.added_at[-1] + 1, "reading stops at the atom that filled it"
    assert b.update(batch(torch.randn(100, 8))) == 0 and len(b.store) == 7


def test_zero_vectors_and_excluded_rows_never_become_atoms() -> None:
    x = torch.randn(10, 4)
    x[3] = 0
    eligible = torch.ones(10, dtype=torch.bool)
    eligible[5] = False
    b = ITDABuilder(4, BuildConfig(k=2, cos_threshold=1.0))
    b.update(batch(x, eligible))
    kept = set(b.store.token_ids.tolist())
    assert 3 not in kept and 5 not in kept and len(kept) > 0
    assert b.tokens_seen == 10 and b.tokens_scored == 8


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
        ({"add_rule": "fast"}, "add_rule"),
        ({"batch_size": 0}, "batch_size"),
        ({"patience_tokens": 0}, "patience_tokens"),
        ({"dtype": "int8"}, "dtype"),
        ({"decision_dtype": "float16"}, "decision_dtype"),
        ({"target_atoms": 100, "max_atoms": 50}, "never be reached"),
    ],
)
def test_impossible_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BuildConfig(**kwargs)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="no field"):
        build_itda_from_activations([torch.randn(4, 4)], k_steps=3, progress=False)


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
        model,
        make_tokens(8),
        HOOK,
        k=4,
        cos_threshold=0.95,
        exclude_special_tokens=False,
        progress=False,
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


def test_patience_stops_exactly_and_independently_of_the_batch_size(
    model: HookedSAETransformer,
) -> None:
    toks = make_tokens(64)
    kw = {"k": 12, "cos_threshold": 0.8, "progress": False}
    full = build_itda(model, toks, HOOK, batch_size=4, **kw)
    added_at = (full.atom_labels[:, 0] * SEQ + full.atom_labels[:, 1]).tolist()
    patience = 2 * SEQ
    # the first gap of `patience` tokens without a new atom ends the build there
    gaps = [b - a for a, b in zip(added_at, [*added_at[1:], 64 * SEQ], strict=True)]
    stop_after = next(a for a, gap in zip(added_at, gaps, strict=True) if gap > patience)
    for batch_size in (1, 4, 64):
        early = build_itda(model, toks, HOOK, batch_size=batch_size, patience_tokens=patience, **kw)
        meta = early.cfg.metadata.itda_builder
        assert meta["stop_reason"] == "converged"
        assert meta["tokens_seen"] == stop_after + patience + 1
        n = early.cfg.d_sae
        assert torch.equal(early.W_dec, full.W_dec[:n])
        assert added_at[n - 1] == stop_after
    with pytest.raises(ValueError, match="patience_tokens"):
        build_itda(model, toks, HOOK, patience_tokens=0, progress=False)


def test_sequence_batch_size_and_token_budget_do_not_change_the_atoms(
    model: HookedSAETransformer,
) -> None:
    toks = make_tokens(48, seed=5)
    kw = {"k": 8, "cos_threshold": 0.9, "progress": False}
    builds = [build_itda(model, toks, HOOK, batch_size=b, **kw) for b in (1, 7, 48, 100)]
    for other in builds[1:]:
        assert torch.equal(other.W_dec, builds[0].W_dec)
        assert torch.equal(other.atom_labels, builds[0].atom_labels)
    budget = 10 * SEQ + 5  # mid-sequence: the stream is cut at exactly this token
    cut = [build_itda(model, toks, HOOK, batch_size=b, max_tokens=budget, **kw) for b in (3, 16)]
    assert torch.equal(cut[0].atom_labels, cut[1].atom_labels)
    assert cut[0].cfg.metadata.itda_builder["tokens_seen"] == budget
    labels = builds[0].atom_labels
    before = (labels[:, 0] * SEQ + labels[:, 1]) < budget
    assert torch.equal(cut[0].atom_labels, labels[before])


def test_target_atoms_finds_the_threshold() -> None:
    acts = anisotropic(3000, 32, seed=4)
    itda = build_itda_from_activations(chunks(acts, 256), k=6, target_atoms=150, progress=False)
    meta = itda.cfg.metadata.itda_builder
    search = meta["threshold_search"]
    assert abs(itda.cfg.d_sae - 150) <= 3 and search["atoms_on_sample"] == itda.cfg.d_sae
    again = build_itda_from_activations(
        [acts], k=6, cos_threshold=search["threshold"], progress=False
    )
    assert torch.equal(again.atom_labels, itda.atom_labels)
    assert meta["cos_threshold"] == search["threshold"] and meta["target_atoms"] == 150
    with pytest.raises(ValueError, match="exceeds"):
        build_itda_from_activations([acts[:100]], k=6, target_atoms=150, progress=False)
    redundant = acts[:5].repeat(100, 1) * torch.rand(500, 1)  # 5 directions, rescaled
    with pytest.raises(ValueError, match="too redundant"):
        build_itda_from_activations([redundant], k=2, target_atoms=50, progress=False)


def test_target_atoms_and_refinement_on_a_model(model: HookedSAETransformer) -> None:
    toks = make_tokens(48, seed=7)
    kw = {"k": 4, "progress": False, "batch_size": 8}
    sized = build_itda(model, toks, HOOK, target_atoms=120, **kw)
    assert abs(sized.cfg.d_sae - 120) <= 2  # target_tolerance 2%
    assert sized.cfg.metadata.itda_builder["threshold_search"]["sample_tokens"] == toks.numel() - 48
    refined = build_itda(model, toks, HOOK, target_atoms=120, refine="energy", **kw)
    assert refined.cfg.d_sae == 120 and abs(refined.cfg.metadata.refined["from_atoms"] - 360) <= 7
    # every refined atom is still a real activation at its recorded position
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    seq, pos = refined.atom_labels[:, 0], refined.atom_labels[:, 1]
    torch.testing.assert_close(F.normalize(cache[HOOK][seq, pos], dim=1), refined.W_dec)
