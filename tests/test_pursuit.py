"""Pursuit kernels against obviously-correct transcriptions and scikit-learn."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
    gp_values,
    gradient_pursuit,
    matching_pursuit,
    mp_values,
    omp_values,
    orthogonal_matching_pursuit,
    pursue,
    pursue_gp,
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
    for fn in (matching_pursuit, orthogonal_matching_pursuit, gradient_pursuit):
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
    for fn in (matching_pursuit, orthogonal_matching_pursuit, gradient_pursuit):
        with pytest.raises(ValueError, match=match):
            fn(x, a, k)


def test_integer_inputs_are_a_type_error() -> None:
    atoms = unit_atoms(20, 8, dtype=torch.float32)
    for fn in (matching_pursuit, gradient_pursuit):
        with pytest.raises(TypeError, match="floating-point"):
            fn(torch.ones(2, 8, dtype=torch.long), atoms, 3)
        with pytest.raises(TypeError, match="floating-point"):
            fn(torch.ones(2, 8), atoms.long(), 3)


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


# --- non-negative gradient pursuit ----------------------------------------------------------------


def numpy_gp(x: np.ndarray, atoms: np.ndarray, k: int) -> np.ndarray:
    """Non-negative gradient pursuit one vector at a time in plain numpy: EleutherAI sparsify's
    ``grad_pursuit_update_step`` (sparsify/itda.py) with the exact step (no 1e-3 floor on u.u)."""
    out = np.zeros((x.shape[0], atoms.shape[0]))
    for i, xi in enumerate(x):
        w = np.zeros(atoms.shape[0])
        for _ in range(k):
            r = xi - w @ atoms
            c = atoms @ r
            support = w != 0
            support[int(np.argmax(c))] = True
            g = support * c
            u = g @ atoms
            step = (u @ r) / (u @ u) if u @ u > 0 else 0.0
            w = np.maximum(w + step * g, 0.0)
        out[i] = w
    return out


def gp_clamps(x: torch.Tensor, atoms: torch.Tensor, k: int) -> torch.Tensor:
    """Per token and step: whether the step clamped a coefficient of its support to 0."""
    _, trace = pursue_gp(x, atoms, k, trace=True)
    assert trace is not None
    alive = trace.alive.long()
    support = torch.cat([torch.zeros_like(alive[:, :1]), alive[:, :-1]], dim=1)
    support |= F.one_hot(trace.picks, k)
    return (support > alive).any(dim=2)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize(
    ("n", "d", "k"), [(64, 16, 8), (300, 24, 40), (10, 32, 12), (8, 3, 8), (5, 3, 12)]
)
def test_gp_matches_literal_algorithm(chunk_size: int | None, n: int, d: int, k: int) -> None:
    atoms, x = unit_atoms(n, d), inputs(60, d)
    code = gradient_pursuit(x, atoms, k, chunk_size=chunk_size)
    assert code.indices.shape == code.values.shape == (60, k)
    ref = torch.from_numpy(numpy_gp(x.numpy(), atoms.numpy(), k))
    torch.testing.assert_close(code.to_dense(n), ref, atol=1e-10, rtol=0)
    assert torch.equal(code.to_dense(n) != 0, ref != 0)
    # one slot per atom: decode is the reconstruction w @ atoms; empty slots are (index 0, value 0)
    torch.testing.assert_close(decode(code, atoms), ref @ atoms, atol=1e-10, rtol=0)
    assert bool((code.indices[code.values == 0] == 0).all())
    live = code.values != 0
    assert all(
        len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(code.indices, live, strict=True)
    )


def test_gp_parity_covers_repicks_and_clamps() -> None:
    """The shapes above include tokens whose steps re-pick a support atom (support < k) and steps
    that clamp a coefficient to 0, where the support rules of sparsify and dictionary_learning
    part ways."""
    atoms, x = unit_atoms(8, 3), inputs(60, 3)
    assert bool(gp_clamps(x, atoms, 8).any())
    assert bool(((gradient_pursuit(x, atoms, 8).values != 0).sum(1) < 8).any())


def test_gp_codes_are_non_negative() -> None:
    atoms, x = unit_atoms(200, 16), inputs(100, 16)
    for k in (1, 5, 30):
        code = gradient_pursuit(x, atoms, k)
        assert bool((code.values >= 0).all())
    # atoms in the half-space a_0 > 0 and an input along -e_0: every correlation is negative,
    # there is nothing to add and the code is all zeros
    half = unit_atoms(50, 8)
    half[:, 0] = half[:, 0].abs() + 0.1
    half = F.normalize(half, dim=1)
    far = torch.zeros(1, 8, dtype=torch.float64)
    far[0, 0] = -3.0
    assert bool(((far @ half.T) < 0).all())
    assert bool((gradient_pursuit(far, half, 5).values == 0).all())


def test_gp_k1_is_the_best_positive_correlation() -> None:
    atoms, x = unit_atoms(100, 12), inputs(80, 12)
    code = gradient_pursuit(x, atoms, 1)
    best = (x @ atoms.T).max(dim=1)
    torch.testing.assert_close(code.values[:, 0], best.values.clamp_min(0), atol=1e-12, rtol=0)
    assert torch.equal(code.indices[:, 0], torch.where(best.values > 0, best.indices, 0))


@pytest.mark.parametrize(("n", "d", "k"), [(100, 6, 12), (8, 3, 8), (200, 16, 20)])
def test_gp_residual_never_grows_on_a_step_without_a_clamp(n: int, d: int, k: int) -> None:
    """The exact line search minimises |r| along the step, so a step that clamps nothing never
    increases it. A clamp can (projected steps of exact length carry no descent guarantee): the
    field's code does this too, and numpy_gp reproduces the same codes."""
    atoms, x = unit_atoms(n, d), inputs(300, d)
    clamps = gp_clamps(x, atoms, k)
    prev = x.norm(dim=1)
    for t in range(1, k + 1):  # the first t steps of a k-step pursuit are the t-step pursuit
        resid = (x - decode(gradient_pursuit(x, atoms, t), atoms)).norm(dim=1)
        grew = resid > prev * (1 + 1e-12) + 1e-12
        assert not bool((grew & ~clamps[:, t - 1]).any())
        prev = resid


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gp_is_batch_invariant(dtype: torch.dtype) -> None:
    atoms, x = unit_atoms(300, 24, dtype=dtype), inputs(40, 24, dtype=dtype)
    batch = gradient_pursuit(x, atoms, 20)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for i in range(x.shape[0]):
        alone = gradient_pursuit(x[i : i + 1], atoms, 20)
        assert torch.equal(alone.indices[0], batch.indices[i])
        torch.testing.assert_close(alone.values[0], batch.values[i], atol=tol, rtol=tol)
    split = gradient_pursuit(x, atoms, 20, chunk_size=3)
    assert torch.equal(split.indices, batch.indices)


def test_gp_keeps_leading_shape_and_dtype_and_accumulates_halves_in_fp32() -> None:
    atoms = unit_atoms(30, 8, dtype=torch.float32)
    x = torch.randn(2, 3, 5, 8)
    code = gradient_pursuit(x, atoms, 4)
    assert code.indices.shape == (2, 3, 5, 4) and code.indices.dtype == torch.long
    assert code.values.dtype == torch.float32
    torch.testing.assert_close(
        code.values.reshape(-1, 4), gradient_pursuit(x.reshape(-1, 8), atoms, 4).values
    )
    half = gradient_pursuit(x.bfloat16(), atoms.bfloat16(), 4)
    assert half.values.dtype == torch.bfloat16
    ref = gradient_pursuit(x.bfloat16().float(), atoms.bfloat16().float(), 4)
    assert torch.equal(half.indices, ref.indices)


def test_gp_through_pursue_and_its_refusals() -> None:
    atoms, x = unit_atoms(50, 8), inputs(10, 8)
    code, trace = pursue("gp", x, atoms, 6)
    assert trace is None
    assert torch.equal(code.values, gradient_pursuit(x, atoms, 6).values)
    with pytest.raises(ValueError, match="trace is for OMP"):
        pursue("gp", x, atoms, 6, trace=True)
    with pytest.raises(ValueError, match="backend='kernel'"):
        pursue("gp", x, atoms, 6, backend="kernel")
    with pytest.raises(ValueError, match="kind must be one of"):
        pursue("lasso", x, atoms, 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_pursuit(x, atoms, 6, chunk_size=0)
    stats = PursuitStats()
    gradient_pursuit(x, atoms, 6, stats=stats)
    assert stats.tokens == 10 and stats.steps == 60


def test_gp_values_replay_the_path_differentiably() -> None:
    atoms, x = unit_atoms(8, 3), inputs(30, 3)  # a shape with clamps and re-picks
    code, trace = pursue_gp(x, atoms, 8, trace=True)
    assert trace is not None
    torch.testing.assert_close(gp_values(x, atoms, trace), code.values, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda xr: gp_values(xr, atoms, trace), x.clone().requires_grad_(True)
    )


# --- numba's thread pool and torch's thread count ------------------------------------------------


@pytest.mark.parametrize("tokens", [8, 200], ids=["serial-chunk", "parallel-chunk"])
def test_numba_kernel_keeps_torchs_thread_count(tokens: int) -> None:
    """numba's OpenMP layer calls omp_set_num_threads(NUMBA_NUM_THREADS) when its pool starts
    (first numba.get_num_threads() or parallel kernel call), which is torch's thread count too.
    A fresh process, so that the pool starts inside the pursuit."""
    pytest.importorskip("numba")
    code = textwrap.dedent(
        f"""
        import numba, torch
        import torch.nn.functional as F
        want = 1 if numba.config.NUMBA_NUM_THREADS != 1 else 2
        torch.set_num_threads(want)
        from itda_lens.pursuit import matching_pursuit
        atoms = F.normalize(torch.randn(500, 32), dim=1)
        matching_pursuit(torch.randn({tokens}, 32), atoms, 8, backend="kernel")
        print(want, torch.get_num_threads(), numba.threading_layer())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    want, got, layer = out.stdout.split()
    assert got == want, f"torch.get_num_threads() became {got} (numba threading layer {layer})"
