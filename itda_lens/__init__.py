"""itda_lens: ITDA dictionaries as drop-in sae_lens SAEs.

Importing the package registers the "itda", "kmeans" and "kmeans_pca" architectures with
sae_lens, so that ``sae_lens.SAE.load_from_disk`` returns :class:`ITDA`, :class:`KMeansSAE` and
:class:`LocalPCASAE` objects.
"""

from itda_lens.builder import (
    BuildConfig,
    ITDABuilder,
    build_itda,
    build_itda_from_activations,
    cos_threshold_from_tau,
)
from itda_lens.kmeans import KMeansSAE, LocalPCASAE
from itda_lens.pursuit import SparseCode, matching_pursuit, orthogonal_matching_pursuit
from itda_lens.sae import ITDA, ITDAConfig

__version__ = "0.1.0"

__all__ = [
    "ITDA",
    "BuildConfig",
    "ITDABuilder",
    "ITDAConfig",
    "KMeansSAE",
    "LocalPCASAE",
    "SparseCode",
    "build_itda",
    "build_itda_from_activations",
    "cos_threshold_from_tau",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
]
