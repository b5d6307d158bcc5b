"""The growing atom store: capacity growth, incremental Gram, exact replay."""

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


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_incremental_gram_equals_full_gram(dtype: torch.dtype, atol: float) -> None:
    # blocks of <= KERNEL_GRAM_BLOCK atoms take the numba kernel, the 100-atom block a matmul
    store = AtomStore(8, capacity=4, dtype=dtype)
    add_blocks(store, [5, 9, 1, 100, 30])
    torch.testing.assert_close(store.gram, store.atoms @ store.atoms.T, atol=atol, rtol=0)


def test_gram_is_dropped_past_its_budget() -> None:
    store = AtomStore(4, gram_max_bytes=10 * 10 * 4)
    add_blocks(store, [6])
    assert store.gram is not None
    add_blocks(store, [6], seed=1)
    assert store.gram is None and len(store) == 12


def test_restore_replays_a_bit_identical_gram() -> None:
    store = AtomStore(16, capacity=3)
    add_blocks(store, [4, 11, 1, 20])
    back = AtomStore.restore(
        store.atoms.clone(), store.labels.clone(), store.token_ids.clone(), list(store.blocks)
    )
    assert torch.equal(back.atoms, store.atoms) and torch.equal(back.gram, store.gram)
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
