"""k-sparse probing: the SAEBench selection rule, on synthetic features and on zoo tasks."""

from __future__ import annotations

import numpy as np
import pytest

from itda_lens.probing import ProbeData, mean_over_tasks, probe_data, sparse_probe
from itda_lens.zoo.corpus import document_books
from itda_lens.zoo.tasks import TASKS


def synthetic(signed: bool) -> tuple[np.ndarray, ProbeData]:
    rng = np.random.default_rng(0)
    n = 200
    y = np.repeat([0, 1], n // 2)
    feats = rng.normal(size=(n, 50))
    feats[:, 17] += (-3.0 if signed else 3.0) * y  # one latent separates the classes
    idx = rng.permutation(n)
    tr, te = idx[:120], idx[120:]
    return feats, ProbeData(tokens=None, tasks={"t": (tr, y[tr], te, y[te])})  # type: ignore[arg-type]


@pytest.mark.parametrize("signed", [False, True])
def test_top1_latent_is_the_separating_one(signed: bool) -> None:
    feats, data = synthetic(signed)
    res = sparse_probe(feats, data)
    assert res["t"]["1"] > 0.9 and set(res["t"]) == {"1", "2", "5", "all"}
    shuffled = feats.copy()
    shuffled[:, 17] = np.random.default_rng(1).normal(size=len(feats))
    assert sparse_probe(shuffled, data)["t"]["1"] < 0.75
    assert mean_over_tasks(res)["1"] == res["t"]["1"]


def test_probe_data_is_balanced_and_labelled_by_book() -> None:
    data = probe_data(
        n_train=8, n_test=4, seq_len=32, tasks=("law_vs_prophets", "old_vs_new_testament")
    )
    books = np.array(document_books())
    from itda_lens import zoo

    spans = zoo.load_token_spans("train", None, 32)
    toks = zoo.load_tokens("train", None, 32)
    lookup = {tuple(t.tolist()): s for t, s in zip(toks, spans, strict=True)}
    for name, (tr_i, tr_y, te_i, te_y) in data.tasks.items():
        assert len(tr_i) == 16 and len(te_i) == 8 and tr_y.sum() == 8 and te_y.sum() == 4
        assert not set(tr_i) & set(te_i)
        groups = TASKS[name]
        for i, label in zip(
            np.concatenate([tr_i, te_i]), np.concatenate([tr_y, te_y]), strict=True
        ):
            doc = lookup[tuple(data.tokens[i].tolist())][1:, 0].numpy()
            assert books[np.bincount(doc).argmax()] in groups[label]
