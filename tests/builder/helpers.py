"""Shared helpers of the builder tests: activation streams and the literal rule."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import orthogonal_mp_gram

from itda_lens.builder import ActivationBatch
from itda_lens.pursuit import reference_matching_pursuit

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


class Crash(Exception):
    pass


def crashing(batches: list[torch.Tensor], after: int) -> Iterator[torch.Tensor]:
    for i, b in enumerate(batches):
        if i == after:
            raise Crash
        yield b
