"""ITDA as a sae_lens SAE: architecture "itda".

The decoder is the dictionary: ``W_dec`` holds unit-norm atoms ``[d_sae, d_in]``; ``W_enc`` is the
tied transpose (a property, never zeros); ``b_dec`` is zero and unused. ``encode`` runs signed
matching pursuit (or OMP, or non-negative gradient pursuit: ``cfg.encoder``, switched with
:meth:`ITDABase.with_encoder`) with ``cfg.k`` steps and returns dense codes like every sae_lens
SAE; ``encode_sparse`` returns ``(indices, values)``. Each atom's provenance — ``atom_labels``
``(sequence index, token position)`` in the token stream the builder read, and ``atom_token_ids`` —
is an int64 buffer that survives ``save_model`` / ``SAE.load_from_disk``.

A save folder records in ``cfg.json``'s metadata its format version (``itda_format_version``; a
newer version is refused with a request to upgrade itda_lens, an absent one reads as version 1), a
save id shared with the weights file (a cfg.json and weights from different saves never load
together) and the sha256 of the weights as written (any changed byte of the weights is refused).

All of this except the ITDA's constructors lives in :class:`ITDABase` / :class:`ITDAConfigBase`,
which the ITDA transcoder (:mod:`itda_lens.saes.itda_transcoder`) shares: a subclass names its
config class, which weight holds the pursuit atoms (``ATOMS``) and the cfg sizes of each weight.

Registered with sae_lens (with the other architectures) in ``itda_lens/__init__.py``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, SAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.util import dtype_to_str, extract_layer_from_tlens_hook_name, str_to_dtype
from safetensors.torch import save_file
from torch import Tensor, nn
from typing_extensions import Self, TypedDict, Unpack, override

from itda_lens.gram import GramRows
from itda_lens.pursuit import (
    ENCODERS,
    UNIT_NORM_TOL,
    Encoder,
    SparseCode,
    check_atoms,
    check_k,
    decode,
    gp_values,
    mp_values,
    omp_values,
    plan_rows,
    pursue,
    pursue_gp,
)
from itda_lens.saes._io import atomic_write, check_sae_folder
from itda_lens.saes.record import BuildRecord, read_build_record
from itda_lens.saes.reference import read_reference, write_reference

ARCHITECTURE = "itda"
#: the save-folder layout this itda_lens writes (1: no version recorded, no checksum; 2: sha256)
FORMAT_VERSION = 2
_INT_BUFFERS = ("atom_labels", "atom_token_ids")
_SAVE_ID_KEY = "itda_save_id"
_FORMAT_KEY = "itda_format_version"
_SHA_KEY = "itda_weights_sha256"
_DTYPE_KEY = "itda_weights_dtype"
#: metadata that describes one save folder, not the dictionary (dropped when deriving an ITDA)
_SAVE_KEYS = (_SAVE_ID_KEY, _FORMAT_KEY, _SHA_KEY, _DTYPE_KEY)
_FLOAT_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
#: set while ITDA.load_from_disk loads a folder whose bytes check_itda_folder just verified
_VERIFIED_ON_DISK: ContextVar[bool] = ContextVar("itda_verified_on_disk", default=False)


@dataclass
class ITDAConfigBase(SAEConfig):
    """What every ITDA-style config holds and checks: ``k`` pursuit steps with encoder ``"mp"``
    (ITDA), ``"omp"`` or ``"gp"`` (non-negative gradient pursuit), at least one atom, no decoder
    bias applied to the input, no activation normalisation, and a save format this itda_lens
    reads."""

    k: int = 40
    encoder: Encoder = "mp"
    apply_b_dec_to_input: bool = False

    @override
    def __post_init__(self) -> None:
        # first: a newer format may have fields this version would misread (the loader hands
        # cfg.json's metadata in as a dict, then replaces it with SAEMetadata)
        check_format_version(self.metadata)
        super().__post_init__()
        check_k(self.k)
        if self.d_sae < 1:
            raise ValueError("empty dictionary: an ITDA needs at least one atom (d_sae >= 1)")
        check_encoder(self.encoder)
        if self.apply_b_dec_to_input:
            raise ValueError("ITDA has no decoder bias: apply_b_dec_to_input must be False")
        if self.normalize_activations != "none":
            raise ValueError(
                "ITDA codes scale with their input (pursuit is scale-equivariant), so "
                f"normalize_activations must be 'none', got {self.normalize_activations!r}"
            )


@dataclass
class ITDAConfig(ITDAConfigBase):
    """Config of an ITDA dictionary: ``k`` pursuit steps with encoder ``"mp"`` (ITDA), ``"omp"``
    or ``"gp"``."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


def check_encoder(encoder: object) -> Encoder:
    """``encoder`` must name a pursuit (:data:`~itda_lens.pursuit.ENCODERS`); returns it."""
    if not isinstance(encoder, str) or encoder not in ENCODERS:
        raise ValueError(
            f"encoder must be one of {', '.join(repr(e) for e in ENCODERS)}, got {encoder!r}"
        )
    return encoder  # type: ignore[return-value]


def _to_bytes(t: Tensor) -> Tensor:
    """int64 -> uint8 planes [..., 8]: 0..255 is exact in every float dtype the loader casts to."""
    return t.to(torch.int64).contiguous().view(torch.uint8).reshape(*t.shape, 8)


def _from_bytes(t: Tensor) -> Tensor:
    return t.round().to(torch.uint8).contiguous().view(torch.int64).reshape(t.shape[:-1])


C = TypeVar("C", bound=ITDAConfigBase)


class AtomOptions(TypedDict, total=False):
    """Keyword options of every ITDA-style constructor (:meth:`ITDA.from_atoms`,
    :meth:`~itda_lens.saes.itda_transcoder.ITDATranscoder.from_pairs`)."""

    labels: Int[Tensor, "n 2"] | None
    """``(sequence index, token position)`` per atom (default ``-1``: unknown)."""
    token_ids: Int[Tensor, " n"] | None
    """The token each atom was read at (default ``-1``: unknown)."""
    encoder: Encoder
    """Pursuit: ``"mp"`` (default, ITDA's), ``"omp"`` or ``"gp"`` (non-negative gradient
    pursuit)."""
    hook_name: str | None
    model_name: str | None
    context_size: int | None
    prepend_bos: bool
    """sae_lens's usage metadata (``prepend_bos`` defaults to True)."""
    dataset_path: str | None
    metadata: Mapping[str, Any] | None
    """Further metadata entries (they override the fields above)."""
    device: str | torch.device | None
    dtype: torch.dtype | str | None
    """Where and in which dtype the SAE is made (default: the input's)."""


class ITDABase(SAE[C]):
    """An SAE over real activations with a pursuit encoder: the ITDA and the ITDA transcoder.

    ``CONFIG`` is its config class (which names the architecture). Pursuit runs over the unit-norm
    atoms in the weight named ``ATOMS`` (``W_enc`` is their tied transpose); codes decode through
    ``W_dec``; ``WEIGHTS`` names every float weight with the cfg fields that size it (zeros until
    filled, never trained). Each atom's provenance is an int64 buffer, saved as byte planes with
    the save id and checksum described in the module doc.
    """

    CONFIG: ClassVar[type[ITDAConfigBase]]
    ATOMS: ClassVar[str]
    WEIGHTS: ClassVar[dict[str, tuple[str, ...]]]

    atom_labels: Int[Tensor, "d_sae 2"]
    atom_token_ids: Int[Tensor, " d_sae"]

    def __init__(self, cfg: C, use_error_term: bool = False):
        super().__init__(cfg)  # sae_lens's Transcoder takes no use_error_term
        if use_error_term:
            self.use_error_term = True
        self._gram_cache: tuple[tuple[Any, ...], GramRows] | None = None
        self._checked_atoms: tuple[Any, ...] | None = None

    @classmethod
    def dims_for(cls, cfg: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """Each float weight a save with this cfg (a dict, as in cfg.json) holds, with the cfg
        fields that size it: ``WEIGHTS`` (a subclass may add weights its cfg asks for)."""
        return cls.WEIGHTS

    def weight_dims(self) -> dict[str, tuple[str, ...]]:
        """Each float weight of this SAE with the cfg fields that size it (:meth:`dims_for`)."""
        return self.dims_for(vars(self.cfg))

    @property
    def has_decoder_bias(self) -> bool:
        """Whether ``b_dec`` is used (added by ``decode``); else it must be zero."""
        return False

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each float weight's shape, from the cfg (:meth:`weight_dims`)."""
        return {
            name: tuple(getattr(self.cfg, dim) for dim in dims)
            for name, dims in self.weight_dims().items()
        }

    @override
    def initialize_weights(self) -> None:
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        for name, shape in self.weight_shapes().items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, **kw), requires_grad=False))
        d_sae = self.cfg.d_sae
        self.register_buffer(
            "atom_labels", torch.full((d_sae, 2), -1, dtype=torch.long, device=self.device)
        )
        self.register_buffer(
            "atom_token_ids", torch.full((d_sae,), -1, dtype=torch.long, device=self.device)
        )

    @property
    def pursuit_atoms(self) -> Float[Tensor, "d_sae d_in"]:
        """The unit-norm atoms pursuit runs over (the weight named ``ATOMS``)."""
        return getattr(self, self.ATOMS)

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:  # type: ignore[override]
        """Tied encoder: the atoms as columns (what sae_lens / SAEBench weight metrics read)."""
        return self.pursuit_atoms.T

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "W_enc":
            raise AttributeError(
                f"{type(self).__name__}'s W_enc is tied to {self.ATOMS}.T; set {self.ATOMS} "
                "(unit-norm atoms) instead"
            )
        super().__setattr__(name, value)

    @property
    def k(self) -> int:
        return self.cfg.k

    # --- encoding -------------------------------------------------------------------------

    def gram_rows(self) -> GramRows | None:
        """The Gram rows pursuit uses for these atoms (every row when they fit the memory budget,
        else a cache that keeps the most used rows across calls). Planned, and the atoms checked
        (finite, unit norm), once per version of the atoms (``ATOMS``): replacing them or editing
        them in place starts a new version; an edit through ``.data`` bypasses torch's version
        counter, so assign a new tensor (``itda.W_dec.data = new``) instead."""
        w = self.pursuit_atoms
        if w.device.type == "meta":
            return None
        dt = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        key = self._atoms_version()
        if self._gram_cache is None or self._gram_cache[0] != key:
            check_atoms(w.detach())
            a = w.detach().to(dt)
            self._gram_cache = (key, plan_rows(a, w.shape[0], self.cfg.k))
        return self._gram_cache[1]

    def _atoms_version(self) -> tuple[Any, ...]:
        """Identifies one version of the pursuit atoms (see :meth:`gram_rows`)."""
        w = self.pursuit_atoms
        dt = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        return (w.data_ptr(), w._version, w.device, dt, w.shape)

    def _check_atoms_once(self) -> None:
        """Check the atoms (finite, unit norm) once per version, as :meth:`gram_rows` does, for
        encoders that read no Gram rows."""
        w = self.pursuit_atoms
        if w.device.type == "meta":
            return
        key = self._atoms_version()
        cached = self._gram_cache is not None and self._gram_cache[0] == key
        if not cached and getattr(self, "_checked_atoms", None) != key:
            check_atoms(w.detach())
            self._checked_atoms = key

    def with_encoder(self, encoder: Encoder) -> Self:
        """A copy of this SAE that encodes with another pursuit: ``"mp"``, ``"omp"`` or ``"gp"``.

        For encoding a built dictionary (the builder judges with MP or OMP) with non-negative
        gradient pursuit: ``itda.with_encoder("gp").encode(x)``; the copy saves and loads with its
        encoder. The copy has its own cfg, hooks and parameter objects, but its weights *share
        storage* with this SAE's (like ``Tensor.detach``: nothing is copied; an in-place edit of
        either one's weights shows in both, assigning new weights to one leaves the other as it
        was), and it reuses the Gram rows already planned for them. Setting ``sae.cfg.encoder``
        in place also works (nothing cached depends on the encoder); it is checked at the next
        encode.
        """
        cfg = type(self.cfg).from_dict({**self.cfg.to_dict(), "encoder": check_encoder(encoder)})
        memo: dict[int, Any] = {id(self.cfg): cfg}
        for p in self.parameters():
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        for b in self.buffers():
            memo[id(b)] = b.detach()
        for value in vars(self).values():  # other tensors held (a transcoder's pending input)
            if isinstance(value, Tensor) and id(value) not in memo:
                memo[id(value)] = value
        if self._gram_cache is not None:  # keyed by the shared storage and version counter
            memo[id(self._gram_cache)] = self._gram_cache
        return copy.deepcopy(self, memo)

    @override
    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        if not isinstance(sae_in, Tensor) or sae_in.ndim == 0:
            raise TypeError(
                f"activations must be a float tensor [..., {self.cfg.d_in}], got {type(sae_in).__name__}"
            )
        width = (
            sae_in.shape[-2] * sae_in.shape[-1]
            if self.hook_z_reshaping_mode and sae_in.ndim > 1
            else sae_in.shape[-1]
        )
        if not sae_in.is_floating_point() or width != self.cfg.d_in:
            raise ValueError(
                f"d_in mismatch: this {type(self).__name__} expects float activations of size "
                f"{self.cfg.d_in} (hook {self.cfg.metadata.hook_name}), got "
                f"{getattr(sae_in, 'dtype', type(sae_in))} of shape {tuple(sae_in.shape)}"
            )
        return super().process_sae_in(sae_in)

    def _pursue(self, sae_in: Tensor, k: int | None = None) -> SparseCode:
        atoms = self.pursuit_atoms.detach()
        k = check_k(self.cfg.k if k is None else k)
        if sae_in.device != atoms.device:
            raise ValueError(
                f"activations are on {sae_in.device} but this {type(self).__name__} is on "
                f"{atoms.device}; move one"
            )
        if not bool(torch.isfinite(sae_in).all()):
            raise ValueError("activations contain NaN or Inf")
        encoder = check_encoder(self.cfg.encoder)  # cfg.encoder may have been set in place
        grad = torch.is_grad_enabled() and sae_in.requires_grad
        if encoder == "gp":
            self._check_atoms_once()
            code, trace = pursue_gp(sae_in.detach(), atoms, k, trace=grad)
            if trace is not None:  # the same path replayed as a differentiable function of x
                vals = gp_values(sae_in, atoms, trace)
                code = SparseCode(code.indices, vals.to(sae_in.dtype))
            return code
        rows = self.gram_rows()  # checks the atoms once per version of them
        code, _ = pursue(encoder, sae_in.detach(), atoms, k, gram=rows)
        if grad:
            # Same picks, coefficients recomputed as a differentiable function of the input.
            x = sae_in.to(atoms.dtype)
            vals = (
                mp_values(x, atoms, code.indices) if encoder == "mp" else omp_values(x, atoms, code)
            )
            code = SparseCode(code.indices, vals.to(sae_in.dtype))
        return code

    def encode_sparse(self, x: Float[Tensor, "... d_in"], k: int | None = None) -> SparseCode:
        """Sparse codes ``(indices, values)`` of shape ``[..., k]`` (fires ``hook_sae_input`` only).

        ``k`` overrides ``cfg.k`` for this call, e.g. to sweep L0 over one dictionary.
        """
        return self._pursue(self.process_sae_in(x), k)

    @override
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Dense codes, as sae_lens expects; fires ``hook_sae_acts_pre`` and ``hook_sae_acts_post``.

        ``hook_sae_acts_pre`` carries the correlations with the atoms (``x @ W_enc``), computed only
        when something is hooked there; editing them does not change the pursuit.
        """
        sae_in = self.process_sae_in(x)
        if self.hook_sae_acts_pre._forward_hooks:
            self.hook_sae_acts_pre(sae_in @ self.W_enc)
        code = self._pursue(sae_in)
        return self.hook_sae_acts_post(code.to_dense(self.cfg.d_sae))

    @override
    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """``codes @ W_dec`` (``+ b_dec`` where :attr:`has_decoder_bias`, else it is zero), with
        sae_lens's output hook."""
        out = feature_acts.to(self.W_dec.dtype) @ self.W_dec
        if self.has_decoder_bias:
            out = out + self.b_dec
        out = self.hook_sae_recons(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def decode_sparse(self, code: SparseCode) -> Float[Tensor, "... d_out"]:
        """Reconstruction from sparse codes (no hooks, no dense code matrix)."""
        out = decode(code, self.W_dec)
        return out + self.b_dec if self.has_decoder_bias else out

    # --- folding: none of it applies to a tied, unit-norm pursuit dictionary -------------------

    @override
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "ITDA atoms are unit-norm and tied; there is no decoder norm to fold"
        )

    @override
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError(
            "ITDA needs no activation scaling: pursuit codes scale with their input"
        )

    @override
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        raise NotImplementedError(
            "ITDA's encoder is tied to its atoms; whitening cannot be folded in"
        )

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def _from_rows(
        cls,
        atoms: Float[Tensor, "n d_in"],
        k: int,
        outputs: Float[Tensor, "n d_out"] | None,
        options: AtomOptions,
        **usage: Any,
    ) -> Self:
        """A dictionary whose pursuit atoms are ``atoms`` normalised to unit length and whose
        ``W_dec`` rows are ``outputs`` divided by the same norms (``outputs=None``: ``W_dec`` holds
        the pursuit atoms). Zero, NaN or Inf atoms, NaN or Inf outputs and mismatched lengths are
        refused. ``usage`` adds metadata entries of the architecture (e.g. ``hook_name_out``);
        ``hook_layer`` comes from ``hook_name`` unless given."""
        unknown = sorted(set(options) - set(AtomOptions.__annotations__))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown}; the options are {list(AtomOptions.__annotations__)}"
            )
        check_atoms(atoms, unit=False)
        norms = atoms.double().norm(dim=1)
        zero = (norms == 0).nonzero().flatten()
        if len(zero):
            raise ValueError(f"zero vectors cannot be atoms (rows {zero[:10].tolist()})")
        n, d_in = atoms.shape
        rows = {cls.ATOMS: atoms.double() / norms.unsqueeze(1)}
        if outputs is not None:
            if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
                raise TypeError(
                    f"outputs must be a floating-point tensor, got {type(outputs).__name__}"
                    + (f" of dtype {outputs.dtype}" if isinstance(outputs, Tensor) else "")
                )
            if outputs.ndim != 2 or outputs.shape[0] != n:
                raise ValueError(
                    f"outputs must have shape [{n}, d_out] (one row per input), got "
                    f"{tuple(outputs.shape)}"
                )
            if not bool(torch.isfinite(outputs).all()):
                raise ValueError("outputs contain NaN or Inf")
            rows["W_dec"] = outputs.double() / norms.unsqueeze(1)
        sizes = {"d_in": d_in, **({} if outputs is None else {"d_out": outputs.shape[1]})}
        labels = _int_tensor(options.get("labels"), (n, 2), "labels")
        token_ids = _int_tensor(options.get("token_ids"), (n,), "token_ids")
        dtype = options.get("dtype")
        dtype = str_to_dtype(dtype) if dtype is not None else atoms.dtype
        device = options.get("device")
        device = torch.device(device) if device is not None else atoms.device
        meta: dict[str, Any] = {
            "hook_name": options.get("hook_name"),
            "hook_layer": None,
            "model_name": options.get("model_name"),
            "context_size": options.get("context_size"),
            "prepend_bos": options.get("prepend_bos", True),
            "dataset_path": options.get("dataset_path"),
            "hook_head_index": None,
            "model_from_pretrained_kwargs": {},
            **usage,
            **(options.get("metadata") or {}),
        }
        if meta.get("hook_layer") is None:
            name = meta.get("hook_name")
            meta["hook_layer"] = extract_layer_from_tlens_hook_name(name) if name else None
        cfg = cls.CONFIG(
            d_sae=n,
            k=k,
            encoder=options.get("encoder", "mp"),
            dtype=dtype_to_str(dtype),
            device=str(device),
            **sizes,
        )
        for key, value in meta.items():
            cfg.metadata[key] = value
        sae = cls(cfg)
        for name, value in rows.items():
            getattr(sae, name).data.copy_(value.to(device=device, dtype=dtype))
        sae.atom_labels.copy_(labels)
        sae.atom_token_ids.copy_(token_ids)
        return sae

    # --- saving and loading ---------------------------------------------------------------

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        for key in _INT_BUFFERS:
            state_dict[key] = _to_bytes(state_dict[key])

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the weights belong to this cfg (keys, save id, shapes, checksum, unit-norm atoms)
        and undo the loader's float cast of provenance."""
        meta = self.cfg.metadata
        weights = self.weight_dims()
        _check_keys(state_dict, tuple(weights))
        saved_id = state_dict.pop(_SAVE_ID_KEY, None)
        _check_save_id(meta, saved_id)
        sha = meta.get(_SHA_KEY)
        for key, shape in self.weight_shapes().items():
            if tuple(state_dict[key].shape) != shape:
                dims = dict.fromkeys(weights[key])
                said = ", ".join(f"{d}={getattr(self.cfg, d)}" for d in dims)
                raise ValueError(
                    f"{key} has shape {tuple(state_dict[key].shape)} but cfg.json says {said}"
                )
        for key in _INT_BUFFERS:
            shape = tuple(getattr(self, key).shape)
            allowed = [(*shape, 8)] if sha is not None else [(*shape, 8), shape]
            if tuple(state_dict[key].shape) not in allowed:
                raise ValueError(
                    f"{key} has shape {tuple(state_dict[key].shape)} in the weights file; "
                    f"cfg.json (d_sae={self.cfg.d_sae}) needs {allowed[0]}"
                )
        atoms = state_dict[self.ATOMS]
        if sha is not None and not _VERIFIED_ON_DISK.get():
            saved = _dtype_from_name(meta.get(_DTYPE_KEY))
            # else the loader rounded: only the file can be checked
            if _lossless(saved, atoms.dtype):
                form = {
                    **{k: state_dict[k].to(saved) for k in weights},
                    **{k: state_dict[k].to(torch.uint8) for k in _INT_BUFFERS},
                }
                if saved_id is not None:
                    form[_SAVE_ID_KEY] = saved_id.to(torch.uint8)
                if _weights_digest(form) != sha:
                    raise ValueError(_CHECKSUM_ERROR)
        for key in _INT_BUFFERS:
            value = state_dict[key]
            state_dict[key] = (
                _from_bytes(value)
                if value.ndim == getattr(self, key).ndim + 1
                else value.round().long()
            )
        for key in weights:
            if key != "b_dec" and not bool(torch.isfinite(state_dict[key]).all()):
                raise ValueError(f"corrupt ITDA weights: {key} contains NaN or Inf")
        if (atoms.float().norm(dim=1) - 1).abs().max().item() > UNIT_NORM_TOL:
            raise ValueError(f"corrupt ITDA weights: atoms in {self.ATOMS} are not unit-norm")
        if not self.has_decoder_bias and bool((state_dict["b_dec"] != 0).any()):
            raise ValueError(
                "corrupt ITDA weights: b_dec must be zero (an ITDA has no decoder bias)"
            )

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save as ``cfg.json`` + ``sae_weights.safetensors``; atomic per file, with a shared save id
        so that a crash between the two writes can never load as a wrong dictionary, and the weights'
        sha256 in ``cfg.json``. A failed write raises ``OSError`` and leaves no temporary file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        self.process_state_dict_for_saving(state)
        state[_SAVE_ID_KEY] = torch.tensor(list(bytes.fromhex(save_id)), dtype=torch.uint8)
        dtype = state[self.ATOMS].dtype
        for key in self.weight_dims():
            state[key] = state[key].to(dtype)
        cfg_dict = self.cfg.to_dict()
        cfg_dict["metadata"] = {
            **cfg_dict["metadata"],
            _FORMAT_KEY: FORMAT_VERSION,
            _SAVE_ID_KEY: save_id,
            _SHA_KEY: _weights_digest(state),
            _DTYPE_KEY: _dtype_name(dtype),
        }
        weights_path, cfg_path = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
        atomic_write(weights_path, lambda tmp: save_file(state, str(tmp)))
        atomic_write(cfg_path, lambda tmp: tmp.write_text(json.dumps(cfg_dict, indent=2)))
        return weights_path, cfg_path

    @override
    @classmethod
    def load_from_disk(
        cls, path: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any
    ) -> Self:  # type: ignore[override]
        """Load a folder of this architecture, with clear errors for folders that are not one or
        are damaged (the weights file's bytes are checked against cfg.json before sae_lens reads
        them)."""
        check_itda_folder(path, cls)
        with _verified_on_disk():
            return super().load_from_disk(path, device=device, dtype=dtype, **kwargs)


class ITDA(ITDABase[ITDAConfig]):
    """A dictionary of real activations used as a tied SAE with a pursuit encoder."""

    CONFIG = ITDAConfig
    ATOMS = "W_dec"
    WEIGHTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "W_dec": ("d_sae", "d_in"),
        "b_dec": ("d_in",),
    }

    @property
    def build_record(self) -> BuildRecord | None:
        """How this dictionary was built (settings, threshold, stream read, timing), or None for
        one that was not built (``from_atoms``)."""
        return read_build_record(self.cfg.metadata)

    def require_build_record(self) -> BuildRecord:
        """:attr:`build_record`, or a clear error for a dictionary that was not built."""
        record = self.build_record
        if record is None:
            raise ValueError(
                "this ITDA has no build record (made by ITDA.from_atoms, not by a build); "
                "build it with build_itda or build_itda_from_activations"
            )
        return record

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_atoms(
        cls, atoms: Float[Tensor, "n d"], k: int = 40, **options: Unpack[AtomOptions]
    ) -> ITDA:
        """An ITDA whose atoms are the given vectors, normalised to unit length on the way in.

        ``options`` (:class:`AtomOptions`): each atom's provenance (``labels``, ``token_ids``), the
        ``encoder``, sae_lens's usage metadata (``hook_name``, ...), ``device`` and ``dtype``. Zero,
        NaN or Inf vectors are refused.
        """
        return cls._from_rows(atoms, k, None, options)

    @classmethod
    def from_reference(
        cls,
        folder: str | Path,
        *,
        tokens: Int[Tensor, "n_seq seq"] | None = None,
        hook_name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> ITDA:
        """An ITDA from the reference code's files (``atoms.pt``, ``atom_indices.pt``,
        ``metadata.yaml``; :func:`itda_lens.saes.reference.read_reference`), its atoms exactly as
        stored (so export then import is the identity)."""
        ref = read_reference(folder, tokens=tokens, hook_name=hook_name)
        itda = cls.from_atoms(
            ref.atoms,
            ref.k,
            labels=ref.labels,
            token_ids=ref.token_ids,
            hook_name=ref.hook_name,
            model_name=ref.model_name,
            context_size=ref.context_size,
            prepend_bos=False,
            dataset_path=ref.dataset_path,
            metadata=ref.metadata,
            device=device,
            dtype=dtype,
        )
        itda.W_dec.data.copy_(ref.atoms.to(itda.W_dec.dtype))  # from_atoms renormalised them
        return itda

    def to_reference(self, folder: str | Path, *, loss_threshold: float | None = None) -> Path:
        """Write the reference code's three files: :func:`itda_lens.saes.reference.write_reference`."""
        return write_reference(self, folder, loss_threshold=loss_threshold)

    @classmethod
    def from_random_activations(
        cls,
        acts: Float[Tensor, "n d"],
        n_atoms: int,
        k: int,
        *,
        seed: int = 0,
        encoder: Encoder = "mp",
        metadata: Mapping[str, Any] | None = None,
    ) -> ITDA:
        """The project's central control: ``n_atoms`` of ``acts`` drawn at random (no repeats,
        all-zero rows skipped) as an ITDA with the same pursuit. An ITDA's gain over this is what
        its greedy selection buys."""
        usable = (acts.norm(dim=1) > 0).nonzero().flatten()
        if (
            isinstance(n_atoms, bool)
            or not isinstance(n_atoms, int)
            or not 1 <= n_atoms <= len(usable)
        ):
            raise ValueError(
                f"cannot draw {n_atoms!r} activations: there are {len(usable)} non-zero ones"
            )
        g = torch.Generator().manual_seed(seed)
        pick = usable[torch.randperm(len(usable), generator=g)[:n_atoms]]
        return cls.from_atoms(acts[pick], k, encoder=encoder, metadata=metadata)

    def select(self, atoms: Int[Tensor, " m"], **metadata: Any) -> ITDA:
        """A new ITDA with the given atoms (in that order), their provenance carried along;
        ``metadata`` entries are added to the copied metadata."""
        atoms = torch.as_tensor(atoms, dtype=torch.long, device=self.W_dec.device)
        if atoms.ndim != 1 or atoms.numel() == 0:
            raise ValueError("select needs a non-empty 1-D tensor of atom indices")
        if int(atoms.min()) < 0 or int(atoms.max()) >= self.cfg.d_sae:
            raise ValueError(f"atom indices must lie in [0, {self.cfg.d_sae})")
        kept = {k: v for k, v in self.cfg.metadata.to_dict().items() if k not in _SAVE_KEYS}
        return type(self).from_atoms(
            self.W_dec.detach()[atoms],
            self.cfg.k,
            labels=self.atom_labels[atoms],
            token_ids=self.atom_token_ids[atoms],
            encoder=self.cfg.encoder,
            metadata={**kept, **metadata},
            device=self.device,
            dtype=self.dtype,
        )

    def crop(self, n_atoms: int) -> ITDA:
        """A new ITDA with the first ``n_atoms`` atoms (insertion order), as the paper crops widths."""
        if not 1 <= n_atoms <= self.cfg.d_sae:
            raise ValueError(f"n_atoms must be in [1, {self.cfg.d_sae}], got {n_atoms}")
        return self.select(torch.arange(n_atoms), cropped_from=self.cfg.d_sae)


def load_itdas(folder: str | Path, device: str = "cpu") -> dict[str, ITDA]:
    """One ITDA folder, or a folder of per-hook ITDA folders (a multi-hook build), as
    ``{hook: ITDA}`` in layer order."""
    folder = Path(folder)
    if (folder / SAE_CFG_FILENAME).is_file():
        itda = ITDA.load_from_disk(folder, device=device)
        return {itda.cfg.metadata.hook_name or folder.name: itda}
    subs = (
        sorted(
            (p for p in folder.iterdir() if (p / SAE_CFG_FILENAME).is_file()),
            key=lambda p: (extract_layer_from_tlens_hook_name(p.name) or 0, p.name),
        )
        if folder.is_dir()
        else []
    )
    if not subs:
        raise FileNotFoundError(f"{folder} holds no ITDA (no cfg.json in it or in its sub-folders)")
    return {p.name: ITDA.load_from_disk(p, device=device) for p in subs}


def check_itda_folder(
    path: str | Path, sae_class: type[ITDABase[Any]] | None = None
) -> dict[str, Any]:
    """Validate a save folder of ``sae_class`` (default :class:`ITDA`) before loading; return its
    cfg dict.

    Checks the architecture and format version, then the weights as stored: the tensors the class
    saves and no others, the save id shared with cfg.json and, for format 2, each tensor's stored
    dtype and the sha256 recorded in cfg.json."""
    cls = ITDA if sae_class is None else sae_class
    architecture = cls.CONFIG.architecture()
    stored: dict[str, Tensor] = {}  # small tensors (the save id) kept whole
    digests: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}

    def visit(key: str, t: Tensor) -> None:
        digests[key], dtypes[key] = _tensor_digest(t), t.dtype
        if key == _SAVE_ID_KEY:
            stored[key] = t

    def check_cfg(cfg: dict[str, Any]) -> None:
        if cfg.get("architecture") != architecture:
            raise ValueError(
                f"{path} is not an {cls.__name__}: its cfg.json has architecture "
                f"{cfg.get('architecture')!r}"
            )
        check_format_version(cfg.get("metadata") or {}, where=str(path))

    cfg = check_sae_folder(path, on_tensor=visit, check_cfg=check_cfg)
    meta = cfg.get("metadata") or {}
    weights = cls.dims_for(cfg)
    _check_keys(digests, tuple(weights))
    _check_save_id(meta, stored.get(_SAVE_ID_KEY))
    sha = meta.get(_SHA_KEY)
    if sha is not None:
        saved = _dtype_name(_dtype_from_name(meta.get(_DTYPE_KEY)))
        for key in digests:
            want = saved if key in weights else "uint8"
            if _dtype_name(dtypes[key]) != want:
                raise ValueError(
                    f"corrupt ITDA weights: {SAE_WEIGHTS_FILENAME} stores {key} as "
                    f"{_dtype_name(dtypes[key])}, but this ITDA was saved with {key} as {want} "
                    "(the file was rewritten after saving)"
                )
        if _combine(digests) != sha:
            raise ValueError(_CHECKSUM_ERROR)
    return cfg


def check_format_version(meta: Any, where: str = "this ITDA folder") -> int:
    """The folder's ITDA format version (1 if absent); refuses versions newer than this itda_lens
    reads."""
    version = meta.get(_FORMAT_KEY, 1) if hasattr(meta, "get") else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: invalid {_FORMAT_KEY} {version!r} in cfg.json")
    if version > FORMAT_VERSION:
        try:
            installed = f" {importlib.metadata.version('itda_lens')}"
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
            installed = ""
        raise ValueError(
            f"{where} was saved by a newer itda_lens (ITDA format version {version}; this "
            f"itda_lens{installed} reads versions up to {FORMAT_VERSION}): upgrade itda_lens "
            "(pip install -U itda_lens) to load it"
        )
    return version


_CHECKSUM_ERROR = (
    f"corrupt ITDA weights: {SAE_WEIGHTS_FILENAME} does not match the sha256 recorded in "
    f"{SAE_CFG_FILENAME} (damaged or modified after saving); restore it or save the ITDA again"
)


def _check_keys(state: Mapping[str, Any], float_keys: tuple[str, ...]) -> None:
    """The weights hold exactly what ``save_model`` writes: ``float_keys`` and the provenance (the
    save id is optional: older saves)."""
    required = (*float_keys, *_INT_BUFFERS)
    missing = [key for key in required if key not in state]
    unexpected = sorted(set(state) - {*required, _SAVE_ID_KEY})
    if missing:
        raise ValueError(
            f"not a complete ITDA save: the weights file lacks {missing}"
            + (f" (it holds {unexpected}: another architecture's weights?)" if unexpected else "")
        )
    if unexpected:
        raise ValueError(
            f"not an ITDA save as written by ITDA.save_model: the weights file has unexpected "
            f"tensors {unexpected}"
        )


def _check_save_id(meta: Mapping[str, Any], saved_id: Tensor | None) -> None:
    """cfg.json and the weights carry the same save id, or neither has one (saves before ids);
    an id on one side only is a save interrupted between its two writes."""
    expected = meta.get(_SAVE_ID_KEY)
    saved_hex = None if saved_id is None else bytes(saved_id.round().to(torch.uint8).tolist()).hex()
    if saved_hex != expected:
        raise ValueError(
            "cfg.json and sae_weights.safetensors come from different saves "
            "(an interrupted or mixed save); re-save the ITDA"
        )


def _tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.sha256(f"{_dtype_name(t.dtype)}:{list(t.shape)}:".encode())
    h.update(memoryview(data))
    return h.hexdigest()


def _combine(digests: Mapping[str, str]) -> str:
    return hashlib.sha256(
        "\n".join(f"{key}={digests[key]}" for key in sorted(digests)).encode()
    ).hexdigest()


def _weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (independent of their order)."""
    return _combine({key: _tensor_digest(t) for key, t in tensors.items()})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_WIDTH:
        raise ValueError(f"invalid {_DTYPE_KEY} {name!r} in cfg.json")
    return dtype


def _lossless(saved: torch.dtype, loaded: torch.dtype) -> bool:
    """Whether casting ``saved`` values to ``loaded`` (as the loader did) kept them exactly."""
    return saved == loaded or _FLOAT_WIDTH.get(loaded, 0) > _FLOAT_WIDTH[saved]


@contextmanager
def _verified_on_disk() -> Iterator[None]:
    token = _VERIFIED_ON_DISK.set(True)
    try:
        yield
    finally:
        _VERIFIED_ON_DISK.reset(token)


def _int_tensor(value: Tensor | None, shape: tuple[int, ...], name: str) -> Tensor:
    if value is None:
        return torch.full(shape, -1, dtype=torch.long)
    value = torch.as_tensor(value)
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    return value.to(torch.long).cpu()
