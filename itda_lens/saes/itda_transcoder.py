"""The ITDA transcoder as a sae_lens Transcoder: architecture "itda_transcoder".

Atom ``i`` is a pair of a model's own activations read at one token: ``x_i`` at the input hook and
``y_i`` at the output hook. The input atoms ``x_i / |x_i|`` (``W_in`` [d_sae, d_in], unit norm) are
what pursuit runs over, and ``W_enc`` is their tied transpose; the output atoms ``y_i / |x_i|``
(``W_dec`` [d_sae, d_out]) are what codes decode through; ``b_dec`` [d_out] is zero. Both sides are
divided by ``|x_i|`` so that a coefficient means the same on both: ``c = |x_i|`` rebuilds ``x_i`` at
the input and ``y_i`` at the output. Encoding is the ITDA's pursuit (signed MP or OMP, ``cfg.k``
steps, :class:`~itda_lens.saes.itda.ITDABase`); decoding is ``codes @ W_dec``.

``cfg.metadata.hook_name`` is the input hook and ``hook_name_out`` the output hook, which is what
``HookedSAETransformer.add_sae`` reads: attached, the transcoder replaces the output hook's
activations by its decoding of the input hook's. Provenance, saving and loading (save id,
checksum, folder checks) are the ITDA's. Registered with sae_lens in ``itda_lens/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from jaxtyping import Float
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from torch import Tensor, nn
from typing_extensions import Unpack, override

from itda_lens.saes.itda import AtomOptions, ITDABase, ITDAConfigBase

ARCHITECTURE = "itda_transcoder"
#: metadata key of the build record (:class:`TranscoderBuildRecord`)
TRANSCODER_BUILD_KEY = "itda_transcoder_build"
Judge = Literal["output", "input"]


@dataclass
class ITDATranscoderConfig(ITDAConfigBase, TranscoderConfig):
    """Config of an ITDA transcoder: ``d_in`` -> ``d_out`` with ``k`` pursuit steps (``"mp"`` or
    ``"omp"``) over ``d_sae`` input atoms."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise ValueError(f"d_out must be an integer >= 1, got {self.d_out!r}")
        if self.reshape_activations != "none":
            raise ValueError(
                "an ITDA transcoder reads and writes whole activations: reshape_activations "
                f"must be 'none', got {self.reshape_activations!r}"
            )


@dataclass(frozen=True)
class TranscoderBuildRecord:
    """How an ITDA transcoder was built (kept in its metadata under ``itda_transcoder_build``)."""

    config: dict[str, Any]
    """Every :class:`~itda_lens.BuildConfig` field as given (k, cos_threshold, encoder, ...)."""
    judge: Judge
    """What a token's reconstruction was judged on: its output ``y`` or its input ``x``."""
    cos_threshold: float
    n_atoms: int
    tokens_seen: int
    """Token positions read, special ones included."""
    tokens_scored: int
    """Positions that could become atoms (not excluded, non-zero input)."""
    stop_reason: str | None
    """'full' (``max_atoms`` reached), or None (the stream or ``max_tokens`` ended it)."""
    excluded_token_ids: list[int]
    forward_seconds: float
    dictionary_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TranscoderBuildRecord:
        try:
            return cls(**d)
        except TypeError as err:
            raise ValueError(f"invalid ITDA transcoder build record: {err}") from err


class ITDATranscoder(ITDABase[ITDATranscoderConfig], Transcoder):
    """Pairs of real activations used as a transcoder: pursuit over the input atoms, decoding
    through the output atoms of the same tokens."""

    CONFIG = ITDATranscoderConfig
    ATOMS = "W_in"
    WEIGHTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "W_in": ("d_sae", "d_in"),
        "W_dec": ("d_sae", "d_out"),
        "b_dec": ("d_out",),
    }

    cfg: ITDATranscoderConfig
    W_in: nn.Parameter

    @property
    def build_record(self) -> TranscoderBuildRecord | None:
        """How this transcoder was built, or None for one that was not (``from_pairs``)."""
        record = self.cfg.metadata.get(TRANSCODER_BUILD_KEY)
        return None if record is None else TranscoderBuildRecord.from_dict(record)

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> ITDATranscoder:
        # sae_lens's Transcoder.from_dict would build a plain TranscoderConfig
        return cls(ITDATranscoderConfig.from_dict(config_dict))

    @classmethod
    def from_pairs(
        cls,
        x: Float[Tensor, "n d_in"],
        y: Float[Tensor, "n d_out"],
        k: int = 40,
        *,
        hook_name_out: str | None = None,
        **options: Unpack[AtomOptions],
    ) -> ITDATranscoder:
        """A transcoder whose atoms are the pairs ``(x[i], y[i])``: ``W_in = x / |x|`` and
        ``W_dec = y / |x|`` (row-wise).

        ``options`` are the ITDA's (:class:`~itda_lens.saes.itda.AtomOptions`: provenance,
        ``encoder``, usage metadata, ``device``, ``dtype``); ``hook_name`` (the input hook) and
        ``hook_name_out`` (the output hook) are given together or not at all. Zero, NaN or Inf
        inputs, NaN or Inf outputs and different numbers of inputs and outputs are refused.
        """
        hook_name = options.get("hook_name")
        if (hook_name is None) != (hook_name_out is None):
            raise ValueError(
                "give hook_name (the input hook) and hook_name_out (the output hook) together: "
                f"got hook_name={hook_name!r}, hook_name_out={hook_name_out!r}"
            )
        return cls._from_rows(x, k, y, options, hook_name_out=hook_name_out)
