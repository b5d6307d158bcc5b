"""Offline k-sparse probing, following SAEBench's sparse-probing procedure, on zoo-corpus tasks.

Tasks are binary classifications of context windows by where in the corpus they come from (which
testament, gospel or epistle, ...), labelled by the book that most of a window's tokens belong to.
For each task: encode every window, mean-pool the codes over non-special positions, pick the top-k
latents by |mean difference| between the classes on the training windows, fit a logistic regression
on those latents (standardised), and report test accuracy for k in {1, 2, 5, all}.

Signed codes (ITDA's MP codes can be negative) are used as they are: the selection ranks latents by
the *absolute* difference of class means, so a latent whose codes go negative for one class counts
as much as one that goes positive; the probe sees the signed pooled values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens import zoo
from itda_lens.activations import iter_hook_activations
from itda_lens.zoo.corpus import document_books
from itda_lens.zoo.tasks import TASKS

K_VALUES: tuple[int | None, ...] = (1, 2, 5, None)  # None = all latents


@dataclass
class ProbeData:
    """Windows and binary labels for each task, split into train and test."""

    tokens: Int[Tensor, "n seq"]
    tasks: dict[
        str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    ]  # train idx, train y, test idx, test y


def probe_data(
    n_train: int = 64,
    n_test: int = 32,
    seq_len: int = 64,
    tokenizer: str = zoo.DEFAULT_TOKENIZER,
    seed: int = 0,
    tasks: tuple[str, ...] = tuple(TASKS),
) -> ProbeData:
    """Balanced train/test windows per task from the training split, labelled by majority book."""
    toks = zoo.load_tokens("train", None, seq_len, tokenizer=tokenizer, shuffle=True, seed=seed)
    spans = zoo.load_token_spans(
        "train", None, seq_len, tokenizer=tokenizer, shuffle=True, seed=seed
    )
    books = np.array(document_books())
    doc = spans[:, 1:, 0].numpy()
    majority = [books[np.bincount(row).argmax()] for row in doc]
    chosen: dict[int, int] = {}
    split: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {}
    for name in tasks:
        groups = TASKS[name]
        picks = [[i for i, b in enumerate(majority) if b in g][: n_train + n_test] for g in groups]
        if min(len(p) for p in picks) < n_train + n_test:
            raise ValueError(f"task {name}: not enough windows for {n_train}+{n_test} per class")
        tr_i, tr_y, te_i, te_y = [], [], [], []
        for label, p in enumerate(picks):
            rows = [chosen.setdefault(i, len(chosen)) for i in p]
            tr_i += rows[:n_train]
            te_i += rows[n_train:]
            tr_y += [label] * n_train
            te_y += [label] * n_test
        split[name] = (tr_i, tr_y, te_i, te_y)
    order = sorted(chosen, key=chosen.get)
    tasks_np = {k: tuple(np.asarray(a) for a in v) for k, v in split.items()}
    return ProbeData(toks[order], tasks_np)  # type: ignore[arg-type]


@torch.no_grad()
def pooled_features(
    encode: Callable[[Tensor], Tensor],
    model: object,
    tokens: Int[Tensor, "n seq"],
    hook_name: str,
    batch_size: int = 32,
) -> Float[np.ndarray, "n f"]:
    """Mean over non-special positions of ``encode(activations)`` for every window."""
    out = []
    for batch in iter_hook_activations(model, tokens, [hook_name], batch_size=batch_size):
        feats = encode(batch.acts[hook_name])
        b = batch.n_sequences
        feats = feats.reshape(b, -1, feats.shape[-1])
        keep = batch.keep.reshape(b, -1, 1).to(feats.device, feats.dtype)
        out.append(((feats * keep).sum(1) / keep.sum(1).clamp_min(1)).float().cpu().numpy())
    return np.concatenate(out)


def sparse_probe(
    features: np.ndarray, data: ProbeData, k_values: tuple[int | None, ...] = K_VALUES
) -> dict[str, dict[str, float]]:
    """Test accuracy per task and k (SAEBench's top-k-by-mean-difference selection)."""
    from sklearn.linear_model import LogisticRegression  # only the probes need scikit-learn
    from sklearn.preprocessing import StandardScaler

    results: dict[str, dict[str, float]] = {}
    for name, (tr_i, tr_y, te_i, te_y) in data.tasks.items():
        x_tr, x_te = features[tr_i], features[te_i]
        diff = np.abs(x_tr[tr_y == 1].mean(0) - x_tr[tr_y == 0].mean(0))
        order = np.argsort(-diff, kind="stable")
        results[name] = {}
        for k in k_values:
            cols = order if k is None else order[:k]
            scaler = StandardScaler().fit(x_tr[:, cols])
            clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr[:, cols]), tr_y)
            results[name]["all" if k is None else str(k)] = float(
                clf.score(scaler.transform(x_te[:, cols]), te_y)
            )
    return results


def mean_over_tasks(results: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = next(iter(results.values())).keys()
    return {k: float(np.mean([r[k] for r in results.values()])) for k in keys}
