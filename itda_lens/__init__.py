"""itda_lens: ITDA dictionaries as drop-in sae_lens SAEs.

Importing the package registers the "itda", "itda_transcoder", "kmeans" and "kmeans_pca"
architectures with sae_lens (below, in one place; re-importing is safe), so that
``sae_lens.SAE.load_from_disk`` returns :class:`ITDA`, :class:`ITDATranscoder`, :class:`KMeansSAE`
and :class:`LocalPCASAE` objects.
"""

from itda_lens.saes import (
    ITDA,
    ITDAConfig,
    ITDATranscoder,
    ITDATranscoderConfig,
    KMeansSAE,
    KMeansSAEConfig,
    LocalPCASAE,
    LocalPCASAEConfig,
    register_architecture,
)

register_architecture("itda", ITDA, ITDAConfig)
register_architecture("itda_transcoder", ITDATranscoder, ITDATranscoderConfig)
register_architecture("kmeans", KMeansSAE, KMeansSAEConfig)
register_architecture("kmeans_pca", LocalPCASAE, LocalPCASAEConfig)

from itda_lens.builder import (  # noqa: E402  (after registration)
    BuildConfig,
    ITDABuilder,
    build_itda,
    build_itda_from_activations,
    build_itda_transcoder,
    cos_threshold_from_tau,
)
from itda_lens.pursuit import (  # noqa: E402
    SparseCode,
    matching_pursuit,
    orthogonal_matching_pursuit,
)

__version__ = "0.1.0"

__all__ = [
    "ITDA",
    "BuildConfig",
    "ITDABuilder",
    "ITDAConfig",
    "ITDATranscoder",
    "ITDATranscoderConfig",
    "KMeansSAE",
    "LocalPCASAE",
    "SparseCode",
    "build_itda",
    "build_itda_from_activations",
    "build_itda_transcoder",
    "cos_threshold_from_tau",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
]
