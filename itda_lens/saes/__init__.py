"""The architectures itda_lens adds to sae_lens, one file each with its config: the ITDA
(``itda``) and the cluster SAEs (``kmeans``, ``kmeans_pca``). They are registered with sae_lens in
``itda_lens/__init__.py``."""

from itda_lens.saes._io import (
    atomic_write,
    check_sae_folder,
    register_architecture,
    temporaries,
)
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig, LocalPCASAE, LocalPCASAEConfig
from itda_lens.saes.itda import ITDA, ITDAConfig, check_itda_folder, load_itdas
from itda_lens.saes.record import (
    BUILD_RECORD_KEY,
    BuildRecord,
    SearchRecord,
    StreamRecord,
    read_build_record,
)

__all__ = [
    "BUILD_RECORD_KEY",
    "ITDA",
    "BuildRecord",
    "ITDAConfig",
    "KMeansSAE",
    "KMeansSAEConfig",
    "LocalPCASAE",
    "LocalPCASAEConfig",
    "SearchRecord",
    "StreamRecord",
    "atomic_write",
    "check_itda_folder",
    "check_sae_folder",
    "load_itdas",
    "read_build_record",
    "register_architecture",
    "temporaries",
]
