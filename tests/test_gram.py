"""Quantized Gram rows: their error bound, the full and cached plans, eviction, growth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itda_lens.gram import QSCALE, GramRows, quantize_


def unit(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def test_quantize_rounds_to_int16_within_half_a_step() -> None:
    g = torch.linspace(-1.2, 1.2, 10_001, dtype=torch.float64)
    q = quantize_(g.clone())
    assert q.dtype == torch.int16 and int(q.max()) == QSCALE and int(q.min()) == -QSCALE
    inside = g.abs() <= 1
    assert ((q[inside].double() / QSCALE - g[inside]).abs() <= 0.5 / QSCALE + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_plan_holds_every_row_within_the_error_bound(dtype: torch.dtype) -> None:
    atoms = unit(300, 24, dtype=dtype)
    rows = GramRows.for_atoms(atoms, budget=2 * 300 * 300)
    assert rows.full and rows.capacity_rows == 300
    ids = torch.arange(300)
    err = (rows.dequantized(ids, torch.float64) - (atoms @ atoms.T).double()).abs().max()
    assert err <= rows.error < 1e-4


def test_cached_plan_fills_on_demand_and_evicts_the_least_used() -> None:
    atoms = unit(100, 16)
    rows = GramRows.for_atoms(atoms, budget=2 * 100 * 5)  # five rows
    assert (
        not rows.full and rows.capacity_rows == 5 and rows.missing(torch.arange(100)).numel() == 100
    )
    got = rows.ensure(torch.tensor([3, 7, 7, 9]), atoms)
    assert got.tolist() == [3, 7, 9] and rows.computed == 3
    rows.count(torch.tensor([3, 3, 3, 9, 9]))  # 7 is used least
    rows.ensure(torch.tensor([1, 2]), atoms)  # fills the last two free slots
    rows.ensure(torch.tensor([50]), atoms)  # evicts a least-used row: 7 (0 uses, before 1 and 2)
    assert rows.missing(torch.tensor([7])).tolist() == [7]
    assert rows.missing(torch.tensor([3, 9, 50])).numel() == 0
    # a row asked for in the same call is never the victim
    rows.ensure(torch.tensor([1, 2, 60]), atoms)
    assert rows.missing(torch.tensor([1, 2, 60])).numel() == 0
    held = torch.tensor([i for i in range(100) if rows.slot[i] >= 0])
    exact = (atoms[held] @ atoms.T).double()
    assert (rows.dequantized(held, torch.float64) - exact).abs().max() <= rows.error


def test_rows_of_more_atoms_than_the_cache_holds() -> None:
    atoms = unit(64, 8)
    rows = GramRows.for_atoms(atoms, budget=2 * 64 * 3)
    ids = torch.tensor([5, 1, 9, 5, 33, 2, 40, 1])
    out = rows.rows_of(ids, atoms, torch.float64)
    assert (out - (atoms[ids] @ atoms.T).double()).abs().max() <= rows.error


def test_append_and_truncate_keep_rows_and_columns_exact() -> None:
    atoms = unit(40, 12)
    rows = GramRows(8, 16, d=12)
    n = 0
    for b in (3, 5, 4):  # 12 atoms: 8 get a row slot, all get their columns in held rows
        rows.reserve(n + b)
        rows.append(atoms[n : n + b] @ atoms[: n + b].T)
        n += b
    assert rows.n == 12 and not rows.full
    held = (rows.slot[:12] >= 0).nonzero().flatten()
    assert held.tolist() == list(range(8))
    exact = (atoms[held] @ atoms[:12].T).double()
    assert (rows.dequantized(held, torch.float64) - exact).abs().max() <= rows.error
    rows.truncate(6)
    assert rows.n == 6 and rows.owner.max() == 5 and rows.missing(torch.arange(6)).numel() == 0
    with pytest.raises(ValueError, match="rows over"):
        rows.append(atoms[6:8] @ atoms[:7].T)


def test_a_full_plan_becoming_a_cache_releases_its_rows_first() -> None:
    # full and cache would not fit the budget at once: the cache starts empty, counts are kept
    atoms = unit(30, 6)
    rows = GramRows.for_atoms(atoms, budget=2 * 30 * 30)
    rows.count(torch.tensor([4, 4, 4, 17, 17, 2]))
    uses = rows.uses.clone()
    rows.reserve(40, 2)
    assert rows.capacity_rows == 2 and rows.q.untyped_storage().nbytes() == 2 * 40 * 2
    assert rows.missing(torch.arange(30)).numel() == 30 and torch.equal(rows.uses[:30], uses)
    rows.ensure(torch.tensor([4, 17]), atoms)
    assert rows.missing(torch.tensor([4, 17])).numel() == 0
    assert (
        rows.dequantized(torch.tensor([4, 17]), torch.float64) - (atoms[[4, 17]] @ atoms.T).double()
    ).abs().max() <= rows.error


def test_a_float_gram_is_used_as_it_is() -> None:
    atoms = unit(20, 5, dtype=torch.float64)
    gram = atoms @ atoms.T
    rows = GramRows.from_gram(gram, 5)
    assert rows.full and not rows.quantized and rows.scale == 1.0 and rows.error < 1e-14
    torch.testing.assert_close(rows.dequantized(torch.tensor([3, 0]), torch.float64), gram[[3, 0]])


def test_no_room_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        GramRows(0, 10, d=4)
