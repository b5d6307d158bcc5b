"""``itda-lens train ARCH``: the one table of comparison-SAE fitters.

Each fitter owns its config (next to its code, like :class:`~itda_lens.splinterp.pam.PAMSettings`)
and has one signature, ``fit(cached, cfg, *, model_name, device)``; the sae_lens trainers also take
``init=`` / ``init_rule=`` (a warm start from an ITDA). A new architecture is one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from sae_lens import SAE

from itda_lens.splinterp.kmeans import KMeansConfig, LocalPCAConfig, fit_kmeans, fit_local_pca
from itda_lens.splinterp.pam import PAMSettings, fit_pam
from itda_lens.training import TRAIN_ARCHITECTURES, SAETrainConfig, fit_sae

__all__ = ["TRAINERS", "Trainer"]


class Trainer(NamedTuple):
    """One architecture: its config class (the CLI's flags), its fitter and its help line."""

    config: type
    fit: Callable[..., SAE[Any]]
    help: str
    warm_start: bool = False


TRAINERS: dict[str, Trainer] = {
    **{
        arch: Trainer(
            SAETrainConfig,
            partial(fit_sae, architecture=arch),
            f"sae_lens {arch} SAE (its own trainer)",
            warm_start=True,
        )
        for arch in TRAIN_ARCHITECTURES
    },
    "pam": Trainer(PAMSettings, fit_pam, "PAM-SGD (exact decoder solve + Adam encoder steps)"),
    "kmeans": Trainer(KMeansConfig, fit_kmeans, "k-means autoencoder (SplInterp)"),
    "kmeans-pca": Trainer(LocalPCAConfig, fit_local_pca, "k-means + local PCA autoencoder"),
}
