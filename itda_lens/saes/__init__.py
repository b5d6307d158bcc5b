"""The architectures itda_lens adds to sae_lens, one file each with its config: the ITDA
(``itda``) and the cluster SAEs (``kmeans``, ``kmeans_pca``). They are registered with sae_lens in
``itda_lens/__init__.py``."""

from itda_lens.saes._io import atomic_write, check_sae_folder, register_architecture
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig, LocalPCASAE, LocalPCASAEConfig
from itda_lens.saes.itda import ITDA, ITDAConfig, check_itda_folder

__all__ = [
    "ITDA",
    "ITDAConfig",
    "KMeansSAE",
    "KMeansSAEConfig",
    "LocalPCASAE",
    "LocalPCASAEConfig",
    "atomic_write",
    "check_itda_folder",
    "check_sae_folder",
    "register_architecture",
]
