"""Building ITDA dictionaries: the add rule (``rule``), the streaming loop (``stream``), its
checkpoints (``checkpoint``), sizing by target (``target``) and the config they share (``config``);
ITDA transcoders (``transcoder``)."""

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.builder.stream import BuildProgress, build_itda, build_itda_from_activations
from itda_lens.builder.target import ThresholdSearch, find_threshold
from itda_lens.builder.transcoder import TranscoderBuilder, build_itda_transcoder
from itda_lens.saes.reference import cos_threshold_from_tau

__all__ = [
    "ActivationBatch",
    "BuildConfig",
    "BuildProgress",
    "ITDABuilder",
    "ThresholdSearch",
    "TranscoderBuilder",
    "build_itda",
    "build_itda_from_activations",
    "build_itda_transcoder",
    "cos_threshold_from_tau",
    "find_threshold",
]
