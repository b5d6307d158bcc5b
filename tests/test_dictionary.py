"""The growing atom store: capacity growth, its Gram rows (full, then a cache), restore."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itda_lens.dictionary import AtomStore


def add_blocks(store: AtomStore, sizes: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vecs = []
    for i, b in enumerate(sizes):
        v = torch.randn(b, store.d_in, generator=g) * 5
        store.add(v, torch.full((b, 2), i), torch.arange(b))
        vecs.append(v)
    return torch.cat(vecs)


def test_add_normalises_grows_and_keeps_order() -> None:
    store = AtomStore(6, capacity=2)
    vecs = add_blocks(store, [3, 1, 7, 5])
    assert len(store) == 16 and store.blocks == [3, 1, 7, 5]
    torch.testing.assert_close(store.atoms, F.normalize(vecs, dim=1))
    assert store.labels[:, 0].tolist() == [0] * 3 + [1] + [2] * 7 + [3] * 5


def held_rows(store: AtomStore) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms whose rows are held, their dequantized rows)."""
    rows = store.rows
    ids = (rows.slot[: len(store)] >= 0).nonzero().flatten()
    return ids, rows.dequantized(ids, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_rows_grow_with_the_atoms_within_their_error(dtype: torch.dtype) -> None:
    store = AtomStore(8, capacity=4, dtype=dtype)
    add_blocks(store, [5, 9, 1, 100, 30])
    ids, rows = held_rows(store)
    assert store.rows.full and ids.tolist() == list(range(145))
    exact = (store.atoms @ store.atoms.T).double()
    assert (rows - exact).abs().max() <= store.rows.error
    assert store.rows.error < 1e-4


def test_gram_rows_become_a_cache_past_the_budget() -> None:
    budget = 8192  # the full int16 Gram of 64 atoms
    small = AtomStore(4, capacity=8, budget=budget)
    assert small.max_full_atoms == 64
    add_blocks(small, [40])
    assert small.rows.full
    add_blocks(small, [40], seed=1)
    assert not small.rows.full and len(small) == 80
    assert small.rows.q.numel() * 2 <= budget
    ids, rows = held_rows(small)
    exact = (small.atoms[ids] @ small.atoms.T).double()
    assert (rows - exact).abs().max() <= small.rows.error


def test_a_capped_store_plans_its_rows_for_its_cap() -> None:
    store = AtomStore(4, capacity=8, max_atoms=50)
    assert store.rows.capacity_rows == 50  # allocated once, backed by memory as it fills
    add_blocks(store, [20, 30])
    assert store.rows.full and store.rows.capacity_rows == 50 and len(store) == 50
    q = store.rows.q
    store.reserve(50 + 4096)  # a kernel reserving a whole sub-batch near the cap
    assert store.rows.q is q and store.rows.capacity_cols == 50  # the rows are not copied
    with pytest.raises(ValueError, match="max_atoms=50"):
        add_blocks(store, [1])


def test_restore_recomputes_the_rows() -> None:
    store = AtomStore(16, capacity=3)
    add_blocks(store, [4, 11, 1, 20])
    back = AtomStore.restore(
        store.atoms.clone(), store.labels.clone(), store.token_ids.clone(), list(store.blocks)
    )
    assert torch.equal(back.atoms, store.atoms) and back.blocks == store.blocks
    assert back.rows.full
    _, rows = held_rows(back)
    assert (rows - held_rows(store)[1]).abs().max() <= 1 / 32767
    with pytest.raises(ValueError, match="blocks sum"):
        AtomStore.restore(store.atoms, store.labels, store.token_ids, [1])


def test_refuses_zero_or_wrong_width_vectors() -> None:
    store = AtomStore(3)
    with pytest.raises(ValueError, match="non-zero"):
        store.add(
            torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="d_in mismatch"):
        store.add(
            torch.ones(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        )
