"""The add rule: the exact sequential rule against a plain transcription, batch-size invariance,
the batch rule, caps, exclusions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itda_lens import (
    BuildConfig,
    ITDABuilder,
    build_itda_from_activations,
)
from itda_lens.budget import set_memory_budget
from itda_lens.dictionary import AtomStore
from itda_lens.pursuit import reference_matching_pursuit
from tests.builder.helpers import (
    anisotropic,
    batch,
    chunks,
    sequential_transcription,
)

HOOK = "blocks.1.hook_resid_post"


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the builder take the torch path (score, test entries, re-pursue) instead of the
    CPU kernel that walks tokens one at a time."""
    monkeypatch.setattr(AtomStore, "kernel_ok", property(lambda self: False))


@pytest.mark.parametrize(("encoder", "path"), [("mp", "kernel"), ("mp", "torch"), ("omp", "torch")])
def test_exact_rule_is_the_sequential_rule(
    encoder: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch":
        _torch_path(monkeypatch)
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


@pytest.mark.parametrize(
    "settings",
    [{}, {"patience_tokens": 150}, {"max_atoms": 50}],
    ids=["plain", "patience", "max_atoms"],
)
def test_kernel_and_torch_paths_agree(
    settings: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    acts = anisotropic(2000, 24, seed=3)
    cfg = BuildConfig(k=5, cos_threshold=0.85, **settings)  # type: ignore[arg-type]

    def build(size: int) -> ITDABuilder:
        b = ITDABuilder(24, cfg)
        for part in chunks(acts, size):
            b.update(batch(part))
        return b

    fast = build(500)
    _torch_path(monkeypatch)
    slow = build(64)
    assert fast.added_at == slow.added_at and len(fast.store) > 30
    assert (fast.tokens_seen, fast.stop_reason) == (slow.tokens_seen, slow.stop_reason)
    torch.testing.assert_close(fast.store.atoms, slow.store.atoms, atol=1e-15, rtol=0)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("budget", [None, 8192], ids=["full", "cache"])
def test_dictionary_does_not_depend_on_the_memory_budget_or_path(
    path: str, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 KiB holds the full Gram of 64 atoms, then a cache of a few rows: the build goes past it
    on both paths and gives the sequential rule's dictionary."""
    if path == "torch":
        _torch_path(monkeypatch)
    acts = anisotropic(900, 24)
    set_memory_budget(budget)
    try:
        b = ITDABuilder(24, BuildConfig(k=6, cos_threshold=0.95))
        for part in chunks(acts, 300):
            b.update(batch(part))
    finally:
        set_memory_budget(None)
    assert b.added_at == sequential_transcription(acts, 6, 0.95, "mp")
    assert len(b.store) > 100, "the build should go past the budget"
    assert b.store.rows.full == (budget is None)


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
    # a fresh builder handed a full store reads nothing either (it used to fail in the batch rule)
    c = ITDABuilder(8, b.cfg)
    c.store, c.tokens_seen = b.store, b.tokens_seen
    assert c.update(batch(torch.randn(100, 8))) == 0 and c.stop_reason == "full"
    assert c.tokens_seen == b.tokens_seen


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


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_state_dict_round_trip_continues_bit_identically(backend: str) -> None:
    """A builder stopped mid-stream, saved through its public state API (tensors + JSON fields,
    as a checkpoint stores them) and loaded into a fresh builder, ends exactly where an
    uninterrupted one does; a snapshot rolls back exactly."""
    import json

    acts = anisotropic(1200, 24, seed=5)
    cfg = BuildConfig(k=6, cos_threshold=0.9, patience_tokens=500)

    def run(b: ITDABuilder, part: torch.Tensor) -> ITDABuilder:
        for piece in chunks(part, 200):
            b.update(batch(piece))
        return b

    whole = run(ITDABuilder(24, cfg, backend=backend), acts)  # type: ignore[arg-type]
    half = run(ITDABuilder(24, cfg, backend=backend), acts[:600])  # type: ignore[arg-type]
    state = half.state_dict()
    state["fields"] = json.loads(json.dumps(state["fields"]))
    resumed = ITDABuilder(24, cfg, backend=backend)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    run(resumed, acts[600:])
    assert torch.equal(resumed.store.atoms, whole.store.atoms)
    assert torch.equal(resumed.store.labels, whole.store.labels)
    assert resumed.added_at == whole.added_at and len(whole.added_at) > 30
    assert (resumed.tokens_seen, resumed.tokens_scored, resumed.stop_reason) == (
        whole.tokens_seen,
        whole.tokens_scored,
        whole.stop_reason,
    )
    snap = half.snapshot()
    run(half, acts[600:900])
    half.rollback(snap)
    assert half.state_dict()["fields"] == state["fields"]
    assert torch.equal(half.store.atoms, state["atoms"].to(half.store.dtype))
    with pytest.raises(ValueError, match="d_in mismatch"):
        ITDABuilder(12, cfg).load_state_dict(state)
