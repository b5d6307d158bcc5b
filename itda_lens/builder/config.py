"""``BuildConfig``: every setting of an ITDA build in one frozen dataclass (the CLI is made from it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from sae_lens.util import str_to_dtype

from itda_lens.pursuit import check_k

AddRule = Literal["exact", "batch"]
Refine = Literal["none", "energy"]
Dtype = Literal["float32", "float64", "float16", "bfloat16"]
Encoder = Literal["mp", "omp"]
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _check_optional_positive(value: object, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")


@dataclass(frozen=True)
class BuildConfig:
    """How an ITDA is built: the add rule, the stream it reads, and how the work is done."""

    k: int = 40
    """Pursuit steps (L0): each activation is judged, and later encoded, with k steps."""
    cos_threshold: float = 0.8
    """An activation becomes an atom when cos(x, its k-step reconstruction) is below this."""
    target_atoms: int | None = None
    """Instead of cos_threshold: search the threshold whose dictionary over the first target_sample_tokens tokens has this many atoms (within target_tolerance); on a longer stream the build stops at this many."""
    target_sample_tokens: int = 65_536
    """Tokens at the start of the stream (at most max_tokens) on which the target_atoms search runs."""
    target_tolerance: float = 0.02
    """Relative tolerance of the target_atoms search (at least one atom)."""
    refine: Refine = "none"
    """With target_atoms: 'energy' builds refine_factor x wider, then keeps the atoms carrying the most coefficient energy."""
    refine_factor: float = 3.0
    """How much wider the dictionary is built before refine='energy' prunes it to target_atoms."""
    max_atoms: int | None = None
    """Stop adding (and reading) once the dictionary holds this many atoms."""
    encoder: Encoder = "mp"
    """Pursuit: 'mp' (signed matching pursuit, ITDA's) or 'omp' (orthogonal, least-squares refit)."""
    add_rule: AddRule = "exact"
    """'exact': judged against every atom added before it (batch size never matters); 'batch': against the batch start (reference code)."""
    batch_size: int = 32
    """Sequences per forward pass (throughput only, under the exact rule)."""
    context_size: int | None = None
    """Tokens per sequence (rows are cut to it; text data is packed to it, default 128)."""
    max_tokens: int | None = None
    """Stop after reading this many tokens (the stream is cut at exactly this token)."""
    patience_tokens: int | None = None
    """Stop a hook's build once this many tokens passed without a new atom (converged)."""
    exclude_special_tokens: bool = True
    """BOS and PAD positions never become atoms."""
    dtype: Dtype = "float32"
    """dtype of the saved dictionary."""
    decision_dtype: Literal["float64", "float32"] = "float64"
    """dtype the add rule computes in; float64 makes verdicts reproducible across batch sizes."""
    device: str | None = None
    """Where the dictionary work runs (default: cuda when present, else the model's / activations' device)."""
    checkpoint_every: int = 50
    """Batches between checkpoints (when the build has a checkpoint folder)."""

    def __post_init__(self) -> None:
        check_k(self.k)
        if not (
            isinstance(self.cos_threshold, int | float)
            and not isinstance(self.cos_threshold, bool)
            and 0.0 < self.cos_threshold <= 1.0
        ):
            raise ValueError(
                f"cos_threshold must be in (0, 1], got {self.cos_threshold!r} "
                "(for the reference code's tau use cos_threshold_from_tau)"
            )
        for name in ("target_atoms", "max_atoms", "context_size", "max_tokens", "patience_tokens"):
            _check_optional_positive(getattr(self, name), name)
        for name in ("batch_size", "checkpoint_every", "target_sample_tokens"):
            check_k(getattr(self, name), name)
        if self.encoder not in ("mp", "omp"):
            raise ValueError(f"encoder must be 'mp' or 'omp', got {self.encoder!r}")
        if self.add_rule not in ("exact", "batch"):
            raise ValueError(f"add_rule must be 'exact' or 'batch', got {self.add_rule!r}")
        for name in ("dtype", "decision_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.decision_dtype in ("float16", "bfloat16"):
            raise ValueError(
                "decision_dtype must be float32 or float64 (half precision cannot rank atoms)"
            )
        if not (isinstance(self.target_tolerance, int | float) and 0 <= self.target_tolerance < 1):
            raise ValueError(f"target_tolerance must be in [0, 1), got {self.target_tolerance!r}")
        if self.refine not in ("none", "energy"):
            raise ValueError(f"refine must be 'none' or 'energy', got {self.refine!r}")
        if self.refine != "none" and self.target_atoms is None:
            raise ValueError("refine='energy' prunes to target_atoms: set target_atoms too")
        if not (isinstance(self.refine_factor, int | float) and self.refine_factor >= 1):
            raise ValueError(f"refine_factor must be >= 1, got {self.refine_factor!r}")
        if (
            self.target_atoms is not None
            and self.max_atoms is not None
            and self.max_atoms < (self.atoms_to_build or 0)
        ):
            raise ValueError(
                f"max_atoms={self.max_atoms} is below the {self.atoms_to_build} atoms the sized "
                "build aims at: the target could never be reached"
            )

    @property
    def atoms_to_build(self) -> int | None:
        """Atoms the sized build aims at: target_atoms, times refine_factor when refining."""
        if self.target_atoms is None:
            return None
        if self.refine == "none":
            return self.target_atoms
        return math.ceil(self.refine_factor * self.target_atoms)

    @property
    def torch_dtype(self) -> torch.dtype:
        return str_to_dtype(self.dtype)

    @property
    def torch_decision_dtype(self) -> torch.dtype:
        return str_to_dtype(self.decision_dtype)

    def replace(self, **changes: Any) -> BuildConfig:
        """A copy with some fields changed (validated again); unknown names are refused."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"BuildConfig has no field(s) {unknown}; fields: {sorted(names)}")
        return BuildConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
