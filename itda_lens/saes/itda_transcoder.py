"""The ITDA transcoder as a sae_lens Transcoder: architecture "itda_transcoder".

Atom ``i`` is a pair of a model's own activations read at one token: ``x_i`` at the input hook and
``y_i`` at the output hook. The input atoms ``x_i / |x_i|`` (``W_in`` [d_sae, d_in], unit norm) are
what pursuit runs over, and ``W_enc`` is their tied transpose; the output atoms ``y_i / |x_i|``
(``W_dec`` [d_sae, d_out]) are what codes decode through. Both sides are divided by ``|x_i|`` so
that a coefficient means the same on both: ``c = |x_i|`` rebuilds ``x_i`` at the input and ``y_i``
at the output. Encoding is the ITDA's pursuit (signed MP, OMP or non-negative gradient pursuit,
``cfg.k`` steps, :class:`~itda_lens.saes.itda.ITDABase`); decoding is ``codes @ W_dec``.

With ``cfg.skip_connection`` (``SkipTranscoder``'s form) the output is ``codes @ W_dec + b_dec +
x @ W_skip.T``, the linear term fitted by least squares on a sample and the output atoms holding
what it leaves; the term is carried from ``encode`` to the next ``decode``
(:class:`SkipThroughDecode`), which is how ``HookedSAETransformer`` splices. Without one ``b_dec``
[d_out] is zero. A build may also refit ``W_dec`` by least squares (then the output atoms are no
longer the pairs' outputs; the record says so).

``cfg.metadata.hook_name`` is the input hook and ``hook_name_out`` the output hook, which is what
``HookedSAETransformer.add_sae`` reads: attached, the transcoder replaces the output hook's
activations by its decoding of the input hook's. Provenance, saving and loading (save id,
checksum, folder checks) are the ITDA's. Registered with sae_lens in ``itda_lens/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from torch import Tensor, nn
from typing_extensions import Unpack, override

from itda_lens.pursuit import SparseCode
from itda_lens.saes.itda import AtomOptions, ITDABase, ITDAConfigBase

ARCHITECTURE = "itda_transcoder"
#: metadata key of the build record (:class:`TranscoderBuildRecord`)
TRANSCODER_BUILD_KEY = "itda_transcoder_build"
Judge = Literal["output", "input"]


@dataclass
class ITDATranscoderConfig(ITDAConfigBase, TranscoderConfig):
    """Config of an ITDA transcoder: ``d_in`` -> ``d_out`` with ``k`` pursuit steps (``"mp"`` or
    ``"omp"``) over ``d_sae`` input atoms."""

    skip_connection: bool = False
    """A linear skip term, ``SkipTranscoder``'s form: ``forward(x) = decode(encode(x)) + x @
    W_skip.T`` with ``W_skip`` [d_out, d_in] and the decoder bias ``b_dec`` (both fitted by least
    squares on a sample); the output atoms then hold what it leaves of each pair's output."""

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
    """'full' (``max_atoms`` reached), 'converged' (``patience_tokens`` without a new atom), or
    None (the stream or ``max_tokens`` ended it)."""
    excluded_token_ids: list[int]
    forward_seconds: float
    """The model's forward passes (the sample's included, when one was read)."""
    dictionary_seconds: float
    """The add rule's time."""
    skip_connection: bool = False
    """Whether a linear skip term was fitted on the sample (the pairs' outputs are its residual)."""
    decoder: Literal["pairs", "lstsq"] = "pairs"
    """'pairs': ``W_dec`` holds the pairs' outputs; 'lstsq': refitted on the sample's codes."""
    sample_pairs: int | None = None
    """Pairs in the sample the skip term, decoder or threshold search were fitted on."""
    search: dict[str, Any] | None = None
    """The ``target_atoms`` threshold search (threshold, target, sample, steps), if any."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TranscoderBuildRecord:
        try:
            return cls(**d)
        except TypeError as err:
            raise ValueError(f"invalid ITDA transcoder build record: {err}") from err


class SkipThroughDecode:
    """A transcoder's skip term ``x @ W_skip.T`` carried through ``encode`` then ``decode``.

    sae_lens 6.54's ``HookedSAETransformer`` (and its error term) splices a transcoder as
    ``decode(encode(x))``, never ``forward(x)``, so a skip term added only in ``forward`` (as
    ``SkipTranscoder`` does) is dropped when spliced. With this mixin ``encode`` keeps the input it
    read and the next ``decode`` adds its skip term (and forgets it): a ``decode`` without an
    ``encode`` of the same positions before it is refused, never given a wrong output. The class
    names its skip weight ``W_skip`` [d_out, d_in] and says whether it has one (``has_skip``).
    """

    W_skip: nn.Parameter
    _skip_input: Tensor | None = None

    @property
    def has_skip(self) -> bool:
        return True

    def encode(self, x: Tensor) -> Tensor:
        acts = super().encode(x)  # type: ignore[misc]
        if self.has_skip:
            self._skip_input = x
        return acts

    def decode(self, feature_acts: Tensor) -> Tensor:
        out = super().decode(feature_acts)  # type: ignore[misc]
        if not self.has_skip:
            return out
        x, self._skip_input = self._skip_input, None
        if x is None or x.shape[:-1] != feature_acts.shape[:-1]:
            got = None if x is None else tuple(x.shape)
            raise ValueError(
                f"{type(self).__name__} has a skip connection: decode needs the input of the "
                f"encode just before it (codes {tuple(feature_acts.shape)}, input {got}); call "
                "forward(x), or encode(x) then decode"
            )
        return out + self.skip(x)

    def skip(self, x: Tensor) -> Tensor:
        """The linear skip term ``x @ W_skip.T``."""
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward_with_activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts = self.encode(x)
        return self.decode(acts), acts


class ITDATranscoder(SkipThroughDecode, ITDABase[ITDATranscoderConfig], Transcoder):
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
    W_skip: nn.Parameter

    @override
    @classmethod
    def dims_for(cls, cfg: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        dims = dict(cls.WEIGHTS)
        if cfg.get("skip_connection"):
            dims["W_skip"] = ("d_out", "d_in")
        return dims

    @property
    @override
    def has_decoder_bias(self) -> bool:
        return self.cfg.skip_connection

    @property
    @override
    def has_skip(self) -> bool:
        return self.cfg.skip_connection

    @override
    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The linear skip term ``x @ W_skip.T`` (zero without a skip connection)."""
        if not self.cfg.skip_connection:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return super().skip(x)

    @override
    def decode_sparse(
        self, code: SparseCode, x: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """Output from sparse codes (no hooks): ``code @ W_dec``, plus ``b_dec`` and the skip term
        of the input ``x`` with a skip connection (then ``x`` is required)."""
        out = super().decode_sparse(code)
        if not self.cfg.skip_connection:
            return out
        if x is None:
            raise ValueError(
                "this transcoder has a skip connection: decode_sparse(code, x) needs the input x"
            )
        return out + self.skip(x)

    def with_skip(
        self, W_skip: Float[Tensor, "d_out d_in"], bias: Float[Tensor, " d_out"]
    ) -> ITDATranscoder:
        """This transcoder with the linear skip term ``x @ W_skip.T + bias`` added to its output
        (in place; returns itself). Its output atoms should hold what the term leaves."""
        d_in, d_out = self.cfg.d_in, self.cfg.d_out
        if tuple(W_skip.shape) != (d_out, d_in) or tuple(bias.shape) != (d_out,):
            raise ValueError(
                f"W_skip must be [{d_out}, {d_in}] and bias [{d_out}], got "
                f"{tuple(W_skip.shape)} and {tuple(bias.shape)}"
            )
        if not (bool(torch.isfinite(W_skip).all()) and bool(torch.isfinite(bias).all())):
            raise ValueError("W_skip or bias contain NaN or Inf")
        kw: dict[str, Any] = {"dtype": self.W_dec.dtype, "device": self.W_dec.device}
        self.cfg.skip_connection = True
        self.W_skip = nn.Parameter(W_skip.detach().to(**kw).clone(), requires_grad=False)
        self.b_dec.data = bias.detach().to(**kw).clone()
        return self

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
