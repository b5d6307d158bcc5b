"""The typed record of how an ITDA was built, kept in its ``cfg.json`` metadata (``itda_build``).

Every build path writes one (:func:`itda_lens.build_itda` per hook,
:func:`itda_lens.build_itda_from_activations`), and every reader — similarity, diffing, the CLI,
the demo and the reports — reads it through :attr:`ITDA.build_record <itda_lens.ITDA.build_record>`
(:func:`read_build_record`), never by string keys. Folders saved before this record existed
(metadata ``itda_builder`` / ``build_config`` / ``token_stream``) are migrated on read; a record
from a newer itda_lens is refused with a request to upgrade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BUILD_RECORD_KEY",
    "PREFIX_SEQUENCES",
    "SCHEMA",
    "BuildRecord",
    "SearchRecord",
    "StreamRecord",
    "chain_digest",
    "prefix_digest",
    "read_build_record",
]

#: metadata key of the record, and the schema this itda_lens writes (1: the first typed record)
BUILD_RECORD_KEY = "itda_build"
SCHEMA = 1
#: sequences of a token stream its fingerprint (``prefix_sha256``) covers
PREFIX_SEQUENCES = 16


def chain_digest(prev: str, t: Tensor) -> str:
    """sha256 of ``prev`` and the bytes of ``t``: a stream's running fingerprint (``sha256``)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(prev.encode() + hashlib.sha256(data).digest()).hexdigest()


def prefix_digest(tokens: Tensor) -> str:
    """The fingerprint a build records of a token stream's first sequences (``prefix_sha256``)."""
    return chain_digest("", tokens[:PREFIX_SEQUENCES])


@dataclass(frozen=True)
class StreamRecord:
    """What the build read. ``sha256`` chains a hash of every batch read; ``n_rows`` activations
    (tokens) were read. For token input (or activations given with the tokens they came from)
    ``n_sequences``, ``context_size``, ``tokenizer`` and ``prefix_sha256`` (a hash of the first
    ``prefix_sequences`` sequences) say which token stream the atom labels index."""

    sha256: str
    n_rows: int
    n_sequences: int | None = None
    context_size: int | None = None
    tokenizer: str | None = None
    prefix_sha256: str | None = None
    prefix_sequences: int | None = None

    @property
    def label_key(self) -> tuple[object, ...] | None:
        """What must agree for two dictionaries' labels to index the same tokens (None: unknown):
        the context size and the first sequences' token ids (which also pin the tokenizer)."""
        if self.prefix_sha256 is None:
            return None
        return (self.context_size, self.prefix_sha256)


@dataclass(frozen=True)
class SearchRecord:
    """The ``target_atoms`` threshold search: its result and (threshold, atoms) steps."""

    threshold: float
    target: int
    sample_tokens: int
    atoms_on_sample: int
    steps: list[list[float]]
    seconds: float


@dataclass(frozen=True)
class BuildRecord:
    """One hook's build: its settings, the threshold it used, what it read and how it ended."""

    hook_name: str | None
    config: dict[str, Any]
    """Every :class:`~itda_lens.BuildConfig` field as given."""
    cos_threshold: float
    """The threshold used (searched when ``config['target_atoms']`` is set)."""
    n_atoms: int
    """Atoms when the build ended (before refinement)."""
    tokens_seen: int
    tokens_scored: int
    batches: int
    stop_reason: str | None
    """'full', 'converged', or None (the stream or ``max_tokens`` ended it)."""
    growth: list[list[int]]
    """(tokens read, atoms) after each atom, thinned geometrically, and at the end."""
    dictionary_seconds: float
    forward_seconds: float
    stream: StreamRecord
    world_size: int = 1
    wire_bytes: int = 0
    excluded_token_ids: list[int] = field(default_factory=list)
    search: SearchRecord | None = None
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildRecord:
        schema = d.get("schema")
        if not isinstance(schema, int) or schema < 1:
            raise ValueError(f"invalid build record: schema {schema!r}")
        if schema > SCHEMA:
            raise ValueError(
                f"this ITDA's build record has schema {schema}, newer than this itda_lens reads "
                f"({SCHEMA}): upgrade itda_lens (pip install -U itda_lens)"
            )
        names = {f.name for f in fields(cls)}
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = sorted(name for name in required if name not in d)
        if missing:
            raise ValueError(f"invalid build record: missing {missing}")
        values = {k: v for k, v in d.items() if k in names}
        values["stream"] = StreamRecord(**d["stream"])
        if d.get("search") is not None:
            values["search"] = SearchRecord(**d["search"])
        return cls(**values)


def read_build_record(meta: Any) -> BuildRecord | None:
    """The build record in an SAE's metadata (an ``SAEMetadata`` or a dict), migrating folders
    saved before it existed; None for dictionaries that were not built (e.g. ``from_atoms``)."""
    get = meta.get if hasattr(meta, "get") else lambda key, default=None: default
    record = get(BUILD_RECORD_KEY, None)
    if record is not None:
        return BuildRecord.from_dict(record)
    old = get("itda_builder", None)
    if old is None:
        return None
    return _migrate(old, get("build_config", None) or {}, get("token_stream", None) or {}, meta)


def _migrate(
    b: Mapping[str, Any], cfg: Mapping[str, Any], s: Mapping[str, Any], meta: Any
) -> BuildRecord:
    """The record of a folder saved with the untyped metadata of itda_lens <= 0.1 (wave 2)."""
    search = b.get("threshold_search")
    rows = s.get("n_rows")
    return BuildRecord(
        hook_name=meta.get("hook_name")
        if isinstance(meta, dict)
        else getattr(meta, "hook_name", None),
        config=dict(cfg),
        cos_threshold=float(b.get("cos_threshold", cfg.get("cos_threshold", float("nan")))),
        n_atoms=int(b.get("n_atoms", 0)),
        tokens_seen=int(b.get("tokens_seen", 0)),
        tokens_scored=int(b.get("tokens_scored", 0)),
        batches=int(b.get("batches", 0)),
        stop_reason=b.get("stop_reason"),
        growth=[list(p) for p in b.get("growth", [])],
        dictionary_seconds=float(b.get("dictionary_seconds", 0.0)),
        forward_seconds=float(b.get("forward_seconds", 0.0)),
        stream=StreamRecord(
            sha256=str(s.get("sha256", "")),
            n_rows=int(rows if rows is not None else b.get("tokens_seen", 0)),
            n_sequences=None if rows is not None else s.get("n_sequences"),
            context_size=s.get("context_size"),
            tokenizer=s.get("tokenizer"),
            prefix_sha256=s.get("prefix_sha256"),
            prefix_sequences=s.get("prefix_sequences"),
        ),
        world_size=int(b.get("world_size", 1)),
        wire_bytes=int(b.get("wire_bytes", 0)),
        excluded_token_ids=list(b.get("excluded_token_ids", [])),
        search=None if search is None else SearchRecord(**search),
    )
