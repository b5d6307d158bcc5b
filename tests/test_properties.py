"""Properties fuzzed with hypothesis over random shapes, dtypes, scales and degenerate data
(duplicate atoms, collinear inputs, tiny norms, k > d, k > atoms): the pursuit's identities, the
add rule's invariant, batch-size invariance, Jaccard's range and symmetry, and save/load round
trips that keep provenance exact. Examples are bounded so the file runs in well under a minute."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from itda_lens import ITDA, build_itda_from_activations
from itda_lens.pursuit import decode, matching_pursuit, orthogonal_matching_pursuit
from itda_lens.saes import BUILD_RECORD_KEY, BuildRecord, StreamRecord
from itda_lens.similarity import jaccard
from tests.builder.helpers import chunks, sequential_transcription

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the suite must not flake: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def matrices(draw: st.DrawFn, max_rows: int = 40, max_dim: int = 12) -> torch.Tensor:
    """Float64 rows with a random scale, some duplicated, some rescaled copies (collinear)."""
    n = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-6, 3))  # tiny norms included
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    if n > 2 and draw(st.booleans()):
        x[n // 2] = x[0]  # an exact duplicate
    if n > 3 and draw(st.booleans()):
        x[-1] = -3.5 * x[1]  # collinear, opposite sign
    return x


def unit(x: torch.Tensor) -> torch.Tensor:
    keep = x.norm(dim=1) > 0
    return F.normalize(x[keep], dim=1)


@SETTINGS
@given(atoms=matrices(), data=st.data())
def test_mp_energy_identity_and_non_increasing_residual(
    atoms: torch.Tensor, data: st.DataObject
) -> None:
    a = unit(atoms)
    if a.shape[0] == 0:
        return
    k = data.draw(st.integers(1, 3 * a.shape[0] + 3), label="k")  # k > atoms and k > d happen
    x = data.draw(
        matrices(max_rows=8, max_dim=a.shape[1]).filter(lambda m: m.shape[1] == a.shape[1]),
        label="x",
    )
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    code = matching_pursuit(x.to(dtype), a.to(dtype), k)
    tol = (1e-4 if dtype == torch.float32 else 1e-10) * (x.norm(dim=1) ** 2 + 1e-300)
    resid = x.clone()
    prev = resid.norm(dim=1)
    for t in range(k):
        resid = resid - code.values[:, t : t + 1].double() * a[code.indices[:, t]]
        now = resid.norm(dim=1)
        assert bool((now <= prev + tol.sqrt()).all()), "the residual never grows"
        prev = now
    energy = (code.values.double() ** 2).sum(dim=1) + (resid**2).sum(dim=1)
    torch.testing.assert_close(
        energy,
        (x**2).sum(dim=1),
        atol=float(tol.max()) * 10,
        rtol=1e-3 if dtype == torch.float32 else 1e-9,
    )


@SETTINGS
@given(atoms=matrices(), data=st.data())
def test_omp_residual_is_orthogonal_to_its_support(
    atoms: torch.Tensor, data: st.DataObject
) -> None:
    a = unit(atoms)
    if a.shape[0] == 0:
        return
    k = data.draw(st.integers(1, 2 * a.shape[0] + 2), label="k")
    x = data.draw(
        matrices(max_rows=6, max_dim=a.shape[1]).filter(lambda m: m.shape[1] == a.shape[1]),
        label="x",
    )
    code = orthogonal_matching_pursuit(x, a, k)
    resid = x - decode(code, a)
    live = code.values != 0
    for i in range(x.shape[0]):
        support = a[code.indices[i][live[i]]]
        if support.shape[0]:
            assert (
                float((support @ resid[i]).abs().max())
                <= 1e-8 * max(float(x[i].norm()), 1e-300) + 1e-300
            )
        assert float(resid[i].norm()) <= float(x[i].norm()) * (1 + 1e-12)


@SETTINGS
@given(
    acts=matrices(max_rows=60, max_dim=8),
    k=st.integers(1, 6),
    threshold=st.floats(0.2, 0.99),
    encoder=st.sampled_from(["mp", "omp"]),
    batch=st.integers(1, 70),
)
def test_add_rule_invariant_and_batch_size_invariance(
    acts: torch.Tensor, k: int, threshold: float, encoder: str, batch: int
) -> None:
    """Every atom was below the threshold over the atoms before it, every other activation was
    not (the plain transcription), and the batch size does not change the dictionary."""
    if not bool((acts.norm(dim=1) > 0).any()):
        return
    expected = sequential_transcription(acts, k, threshold, encoder)
    kw = {"k": k, "cos_threshold": threshold, "encoder": encoder, "progress": False}
    whole = build_itda_from_activations([acts], **kw)
    assert whole.atom_labels[:, 0].tolist() == expected
    split = build_itda_from_activations(chunks(acts, batch), **kw)
    assert torch.equal(split.W_dec, whole.W_dec) and torch.equal(
        split.atom_labels, whole.atom_labels
    )


def _with_labels(labels: list[tuple[int, int]]) -> ITDA:
    stream = StreamRecord("s", 64, n_sequences=8, context_size=8, tokenizer="t", prefix_sha256="x")
    record = BuildRecord(
        hook_name=None, config={}, cos_threshold=0.9, n_atoms=len(labels), tokens_seen=64,
        tokens_scored=64, batches=1, stop_reason=None, growth=[], dictionary_seconds=0.0,
        forward_seconds=0.0, stream=stream,
    )  # fmt: skip
    return ITDA.from_atoms(
        torch.randn(max(1, len(labels)), 4),
        2,
        labels=torch.tensor(labels or [(0, 0)], dtype=torch.long),
        metadata={BUILD_RECORD_KEY: record.to_dict()},
    )


@SETTINGS
@given(
    a=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 7)), min_size=1, max_size=30),
    b=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 7)), min_size=1, max_size=30),
)
def test_jaccard_is_symmetric_and_in_the_unit_interval(a: list, b: list) -> None:
    x, y = _with_labels(a), _with_labels(b)
    j = jaccard(x, y)
    assert 0.0 <= j <= 1.0 and j == jaccard(y, x)
    assert jaccard(x, x) == 1.0
    assert (j == 1.0) == (set(a) == set(b)) and (j == 0.0) == (not set(a) & set(b))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("roundtrip")


@SETTINGS
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 16),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_save_load_round_trip_keeps_labels_exact(
    n: int, d: int, dtype: str, seed: int, folder: Path
) -> None:
    g = torch.Generator().manual_seed(seed)
    big = np.iinfo(np.int64)
    labels = torch.randint(-1, 2**62, (n, 2), generator=g)
    labels[0] = torch.tensor([big.max, -1])  # extremes survive the loader's float cast
    token_ids = torch.randint(-1, 2**40, (n,), generator=g)
    itda = ITDA.from_atoms(
        torch.randn(n, d, generator=g), 3, labels=labels, token_ids=token_ids, dtype=dtype
    )
    path = folder / f"{n}-{d}-{dtype}-{seed}"
    itda.save_model(path)
    back = ITDA.load_from_disk(path, dtype=dtype)
    assert torch.equal(back.atom_labels, labels) and torch.equal(back.atom_token_ids, token_ids)
    assert back.W_dec.dtype == itda.W_dec.dtype and torch.equal(back.W_dec, itda.W_dec)
