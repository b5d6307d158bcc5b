"""The architectures itda_lens adds to sae_lens, one file each with its config: the ITDA
(``itda``), the ITDA transcoder (``itda_transcoder``) and the cluster SAEs (``kmeans``,
``kmeans_pca``). They are registered with sae_lens in ``itda_lens/__init__.py``."""

from itda_lens.saes._io import (
    atomic_write,
    check_sae_folder,
    register_architecture,
    temporaries,
)
from itda_lens.saes.cluster import KMeansSAE, KMeansSAEConfig, LocalPCASAE, LocalPCASAEConfig
from itda_lens.saes.itda import ITDA, ITDABase, ITDAConfig, check_itda_folder, load_itdas
from itda_lens.saes.itda_transcoder import (
    TRANSCODER_BUILD_KEY,
    ITDATranscoder,
    ITDATranscoderConfig,
    SkipThroughDecode,
    TranscoderBuildRecord,
)
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
    "TRANSCODER_BUILD_KEY",
    "BuildRecord",
    "ITDABase",
    "ITDAConfig",
    "ITDATranscoder",
    "ITDATranscoderConfig",
    "KMeansSAE",
    "KMeansSAEConfig",
    "LocalPCASAE",
    "LocalPCASAEConfig",
    "SearchRecord",
    "SkipThroughDecode",
    "StreamRecord",
    "TranscoderBuildRecord",
    "atomic_write",
    "check_itda_folder",
    "check_sae_folder",
    "load_itdas",
    "read_build_record",
    "register_architecture",
    "temporaries",
]
