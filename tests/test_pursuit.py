"""Pursuit kernels against obviously-correct transcriptions and scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import orthogonal_mp_gram

from itda_lens.gram import GramRows
from itda_lens.pursuit import (
    PursuitStats,
    SparseCode,
    chunk_tokens,
    decode,
    matching_pursuit,
    mp_values,
    omp_values,
    orthogonal_matching_pursuit,
    reference_matching_pursuit,
)


def unit_atoms(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def inputs(t: int, d: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g, dtype=dtype) * 3


def numpy_mp(x: np.ndarray, atoms: np.ndarray, k: int) -> np.ndarray:
    """Algorithm 2 for one vector at a time, in plain numpy."""
    out = np.zeros((x.shape[0], atoms.shape[0]))
    for i, r in enumerate(x.copy()):
        for _ in range(k):
            corr = atoms @ r
            j = int(np.argmax(np.abs(corr)))
            out[i, j] += corr[j]
            r = r - corr[j] * atoms[j]
    return out


def test_reference_is_algorithm_2() -> None:
    atoms, x = unit_atoms(40, 12), inputs(30, 12)
    np.testing.assert_allclose(
        reference_matching_pursuit(x, atoms, 7).numpy(),
        numpy_mp(x.numpy(), atoms.numpy(), 7),
        atol=1e-12,
    )


@pytest.mark.parametrize("gram", ["auto", None, "given"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize(("n", "d", "k"), [(64, 16, 8), (300, 24, 40), (10, 32, 12)])
def test_mp_matches_literal_algorithm(
    gram: str | None, chunk_size: int | None, n: int, d: int, k: int
) -> None:
    atoms, x = unit_atoms(n, d), inputs(50, d)
    g = atoms @ atoms.T if gram == "given" else gram
    code = matching_pursuit(x, atoms, k, gram=g, chunk_size=chunk_size)
    assert code.indices.shape == code.values.shape == (50, k)
    dense = reference_matching_pursuit(x, atoms, k)
    torch.testing.assert_close(code.to_dense(n), dense, atol=1e-10, rtol=0)


def test_mp_float32_agrees_with_float64_up_to_rounding() -> None:
    atoms, x = unit_atoms(512, 64), inputs(200, 64)
    exact = matching_pursuit(x, atoms, 20)
    fast = matching_pursuit(x.float(), atoms.float(), 20)
    assert fast.values.dtype == torch.float32
    # near-ties may flip late picks in fp32; the first picks and the reconstruction must agree
    assert (fast.indices[:, :5] == exact.indices[:, :5]).float().mean() > 0.99
    err = (decode(fast, atoms.float()).double() - decode(exact, atoms)).norm(dim=1) / x.norm(dim=1)
    assert err.median() < 1e-4


def test_mp_keeps_leading_shape_and_dtype() -> None:
    atoms = unit_atoms(30, 8, dtype=torch.float32)
    x = torch.randn(2, 3, 5, 8)
    code = matching_pursuit(x, atoms, 4)
    assert code.indices.shape == (2, 3, 5, 4) and code.indices.dtype == torch.long
    flat = matching_pursuit(x.reshape(-1, 8), atoms, 4)
    torch.testing.assert_close(code.values.reshape(-1, 4), flat.values)


def test_mp_half_inputs_accumulate_in_fp32() -> None:
    atoms = unit_atoms(64, 16, dtype=torch.float32)
    x = torch.randn(20, 16)
    code = matching_pursuit(x.bfloat16(), atoms.bfloat16(), 6)
    assert code.values.dtype == torch.bfloat16
    ref = matching_pursuit(x.bfloat16().float(), atoms.bfloat16().float(), 6)
    assert (code.indices == ref.indices).all()


def test_mp_can_pick_an_atom_twice_and_dense_view_sums_slots() -> None:
    # two atoms 10 degrees apart: MP alternates between them, revisiting the first
    a = torch.tensor([[1.0, 0.0], [np.cos(0.17), np.sin(0.17)]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.3]], dtype=torch.float64)
    code = matching_pursuit(x, a, 6)
    assert len(set(code.indices[0].tolist())) < 6
    dense = code.to_dense(2)
    torch.testing.assert_close(dense, reference_matching_pursuit(x, a, 6))
    torch.testing.assert_close(
        dense[0], torch.stack([code.values[0][code.indices[0] == j].sum() for j in range(2)])
    )


def test_zero_vector_gives_zero_codes() -> None:
    atoms = unit_atoms(20, 8)
    for fn in (matching_pursuit, orthogonal_matching_pursuit):
        code = fn(torch.zeros(3, 8, dtype=torch.float64), atoms, 5)
        assert (code.values == 0).all()


@given(seed=st.integers(0, 2**16), k=st.integers(1, 12), n=st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_mp_energy_identity(seed: int, k: int, n: int) -> None:
    """Each MP step removes exactly v^2 of energy: |x|^2 = |r_k|^2 + sum v_t^2, and |r| never grows."""
    atoms, x = unit_atoms(n, 6, seed), inputs(10, 6, seed + 1)
    code = matching_pursuit(x, atoms, k)
    resid = x - decode(code, atoms)
    torch.testing.assert_close(
        (x * x).sum(1), (resid * resid).sum(1) + (code.values**2).sum(1), atol=1e-9, rtol=1e-9
    )
    assert bool(((resid * resid).sum(1) <= (x * x).sum(1) + 1e-9).all())


def sklearn_omp(x: torch.Tensor, atoms: torch.Tensor, k: int) -> np.ndarray:
    gram = (atoms @ atoms.T).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "ended prematurely" on in-span inputs
        return orthogonal_mp_gram(gram, (atoms @ x.T).numpy(), n_nonzero_coefs=k).T


@pytest.mark.parametrize("gram", ["auto", None])
@pytest.mark.parametrize(("n", "d", "k"), [(64, 16, 8), (200, 32, 20), (30, 8, 8)])
def test_omp_matches_sklearn(gram: str | None, n: int, d: int, k: int) -> None:
    atoms, x = unit_atoms(n, d), inputs(40, d)
    code = orthogonal_matching_pursuit(x, atoms, k, gram=gram, chunk_size=9)
    np.testing.assert_allclose(code.to_dense(n).numpy(), sklearn_omp(x, atoms, k), atol=1e-10)


def test_omp_stops_early_in_span_like_sklearn() -> None:
    atoms = unit_atoms(50, 16)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 3, 1, generator=g, dtype=torch.float64) * atoms[:3]).sum(1)
    code = orthogonal_matching_pursuit(x, atoms, 10)
    np.testing.assert_allclose(code.to_dense(50).numpy(), sklearn_omp(x, atoms, 10), atol=1e-10)
    assert ((code.values != 0).sum(1) == 3).all()


def test_omp_residual_is_orthogonal_to_support() -> None:
    atoms, x = unit_atoms(100, 20), inputs(10, 20)
    code = orthogonal_matching_pursuit(x, atoms, 8)
    resid = x - decode(code, atoms)
    corr = torch.einsum("tkd,td->tk", atoms[code.indices], resid)
    assert corr.abs().max() < 1e-10


def test_omp_reconstructs_at_least_as_well_as_mp() -> None:
    atoms, x = unit_atoms(200, 16), inputs(100, 16)
    mp = (x - decode(matching_pursuit(x, atoms, 6), atoms)).norm(dim=1)
    omp = (x - decode(orthogonal_matching_pursuit(x, atoms, 6), atoms)).norm(dim=1)
    assert (omp <= mp + 1e-9).float().mean() > 0.9 and omp.mean() < mp.mean()


def test_decode_matches_dense_matmul() -> None:
    atoms, x = unit_atoms(70, 10), inputs(25, 10)
    code = matching_pursuit(x, atoms, 9)
    torch.testing.assert_close(decode(code, atoms), code.to_dense(70) @ atoms)


def test_values_are_differentiable_and_match_autograd_through_the_literal_algorithm() -> None:
    atoms, x = unit_atoms(40, 8), inputs(5, 8)
    code = matching_pursuit(x, atoms, 5)
    xr = x.clone().requires_grad_(True)
    vals = mp_values(xr, atoms, code.indices)
    torch.testing.assert_close(vals.detach(), code.values)
    (vals * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    # autograd through a literal transcription that replays the same picks
    xl = x.clone().requires_grad_(True)
    resid, coefs = xl, []
    for t in range(5):
        atom = atoms[code.indices[:, t]]
        c = (resid * atom).sum(1)
        coefs.append(c)
        resid = resid - c[:, None] * atom
    (torch.stack(coefs, 1) * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(xr.grad, xl.grad)
    omp = orthogonal_matching_pursuit(x, atoms, 5)
    torch.testing.assert_close(omp_values(x, atoms, omp), omp.values)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda a: (torch.full((2, 8), float("nan")), a, 3), "NaN or Inf"),
        (lambda a: (torch.randn(2, 7), a, 3), "d_in mismatch"),
        (lambda a: (torch.randn(2, 8), a, 0), "k must be"),
        (lambda a: (torch.randn(2, 8), a[:0], 3), "empty dictionary"),
        (lambda a: (torch.randn(2, 8), a * 2, 3), "unit L2 norm"),
        (lambda a: (torch.randn(2, 8), a, 2.5), "k must be"),
        (lambda a: (torch.randn(2, 8, device="meta"), a, 3), "is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match: str) -> None:
    atoms = unit_atoms(20, 8, dtype=torch.float32)
    x, a, k = make(atoms)
    for fn in (matching_pursuit, orthogonal_matching_pursuit):
        with pytest.raises(ValueError, match=match):
            fn(x, a, k)


def test_integer_inputs_are_a_type_error() -> None:
    atoms = unit_atoms(20, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="floating-point"):
        matching_pursuit(torch.ones(2, 8, dtype=torch.long), atoms, 3)
    with pytest.raises(TypeError, match="floating-point"):
        matching_pursuit(torch.ones(2, 8), atoms.long(), 3)


def test_sparse_code_is_a_named_tuple() -> None:
    code = matching_pursuit(inputs(3, 8), unit_atoms(20, 8), 2)
    assert isinstance(code, SparseCode)
    indices, values = code
    assert indices is code.indices and values is code.values


def literal_picks(
    x: torch.Tensor, atoms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 with its picks kept: (indices, values, final residual) per token."""
    r = x.clone()
    rows = torch.arange(x.shape[0])
    idx, val = [], []
    for _ in range(k):
        c = r @ atoms.T
        j = c.abs().argmax(dim=1)
        v = c[rows, j]
        idx.append(j)
        val.append(v)
        r = r - v[:, None] * atoms[j]
    return torch.stack(idx, 1), torch.stack(val, 1), r


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("capacity", [1, 9, None], ids=["1-row", "9-rows", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mp_at_any_budget_is_the_literal_algorithm(
    backend: str, capacity: int | None, dtype: torch.dtype
) -> None:
    """Past the budget the rows are a cache of 1 or 9 of 400 rows: the same supports as the
    literal algorithm (fp64: every token; fp32: up to near-ties) and the same residuals."""
    atoms, x = unit_atoms(400, 32, dtype=dtype), inputs(60, 32, dtype=dtype)
    rows = GramRows.for_atoms(atoms, 2 * 400 * capacity) if capacity else "auto"
    stats = PursuitStats()
    code = matching_pursuit(x, atoms, 30, gram=rows, backend=backend, stats=stats)  # type: ignore[arg-type]
    idx, val, resid = literal_picks(x, atoms, 30)
    same = (code.indices == idx).all(dim=1)
    if dtype == torch.float64:
        assert bool(same.all())
        torch.testing.assert_close(code.values, val, atol=1e-10, rtol=0)
    else:
        assert same.float().mean() >= 0.9
    ours = x - decode(code, atoms)
    err = ((ours - resid).norm(dim=1) / x.norm(dim=1))[same]
    assert err.max() < (1e-12 if dtype == torch.float64 else 1e-5)
    assert stats.full_gram == (capacity is None)
    if capacity is not None:
        assert stats.rows_computed > 0


@pytest.mark.parametrize("capacity", [1, 9])
def test_omp_past_the_budget_matches_sklearn(capacity: int) -> None:
    atoms, x = unit_atoms(200, 32), inputs(40, 32)
    rows = GramRows.for_atoms(atoms, 2 * 200 * capacity)
    code = orthogonal_matching_pursuit(x, atoms, 20, gram=rows, chunk_size=9)
    np.testing.assert_allclose(code.to_dense(200).numpy(), sklearn_omp(x, atoms, 20), atol=1e-10)
    assert rows.computed > 0


def test_kernel_and_torch_paths_pick_the_same_atoms() -> None:
    atoms, x = unit_atoms(3000, 48, dtype=torch.float32), inputs(300, 48, dtype=torch.float32)
    rows = GramRows.for_atoms(atoms, 2 * 3000 * 3000)
    kernel = matching_pursuit(x, atoms, 40, gram=rows, backend="kernel")
    torch_path = matching_pursuit(x, atoms, 40, gram=rows, backend="torch")
    assert (kernel.indices == torch_path.indices).all(dim=1).float().mean() >= 0.97
    torch.testing.assert_close(
        decode(kernel, atoms), decode(torch_path, atoms), atol=1e-3, rtol=1e-3
    )


def test_gpu_path_with_gpu_sizing_runs_on_cpu() -> None:
    """What a CUDA device runs: the torch path, chunked as a GPU's budget plans it."""
    atoms, x = unit_atoms(500, 24), inputs(2000, 24)
    budget = 64 * 2**20
    cpu = chunk_tokens("mp", 16, 500, 8, torch.device("cpu"), budget)
    gpu = chunk_tokens("mp", 16, 500, 8, torch.device("cuda"), 2**33)
    assert gpu > cpu and chunk_tokens("kernel", 16, 500, 8, torch.device("cpu"), budget) > cpu
    stats = PursuitStats()
    code = matching_pursuit(x, atoms, 16, backend="torch", chunk_size=min(gpu, 700), stats=stats)
    idx, _, _ = literal_picks(x, atoms, 16)
    assert torch.equal(code.indices, idx) and stats.rounds == 0 and stats.chunk == 700


def test_kernel_backend_refuses_what_it_cannot_run() -> None:
    atoms, x = unit_atoms(20, 8), inputs(3, 8)
    with pytest.raises(ValueError, match="backend='kernel'"):
        matching_pursuit(x, atoms, 3, gram=None, backend="kernel")
    with pytest.raises(ValueError, match="backend must be"):
        matching_pursuit(x, atoms, 3, backend="gpu")  # type: ignore[arg-type]


def test_zero_and_tiny_residuals_refresh_instead_of_looping() -> None:
    """Exact reconstructions leave a zero residual: every atom ties at 0 and is a candidate."""
    atoms = unit_atoms(50, 8)
    x = torch.cat([torch.zeros(2, 8, dtype=torch.float64), 2 * atoms[:3]])
    stats = PursuitStats()
    code = matching_pursuit(x, atoms, 12, stats=stats)
    torch.testing.assert_close(
        code.to_dense(50), reference_matching_pursuit(x, atoms, 12), atol=1e-12, rtol=0
    )
    assert stats.refreshes > 0
