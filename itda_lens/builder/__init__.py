"""Building ITDA dictionaries: the add rule (``rule``), the streaming loop (``stream``), its
checkpoints (``checkpoint``), sizing by target (``target``) and the config they share (``config``)."""

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.builder.stream import BuildProgress, build_itda, build_itda_from_activations
from itda_lens.builder.target import ThresholdSearch, find_threshold
from itda_lens.saes.reference import cos_threshold_from_tau

__all__ = [
    "ActivationBatch",
    "BuildConfig",
    "BuildProgress",
    "ITDABuilder",
    "ThresholdSearch",
    "build_itda",
    "build_itda_from_activations",
    "cos_threshold_from_tau",
    "find_threshold",
]
