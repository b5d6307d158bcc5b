"""The reference code's dictionary files (pleask/itda ``train.py``), read into an ITDA and written back.

A reference dictionary is a folder of three files: ``atoms.pt`` (float [n, d], unit rows, a
``torch.save``\\ d tensor), ``atom_indices.pt`` (int64 [n, 2]: the sequence index in the training
stream and the token position) and ``metadata.yaml`` (the trainer's config: ``lm_name``, ``layer``,
``k``, ``loss_threshold`` tau, ``dataset``, ``seq_len``, ``batch_size``, ``steps``, ``seed``,
``max_dict_size``, ...). The tensors are read with ``torch.load(weights_only=True)`` (never by
unpickling objects). The reference encodes with plain signed matching pursuit over the atoms, which
is the ITDA's ``mp`` encoder, and adds a token when the normalised per-dimension MSE exceeds tau,
which is :func:`cos_threshold_from_tau`.

The labels index the reference's token stream: the dataset's documents in order, tokenized by
``lm_name``'s tokenizer into ``seq_len`` windows. Token ids are unknown unless that stream is given
(``tokens=``); two dictionaries imported from the same run (same model, dataset and ``seq_len``)
are comparable by label Jaccard, and one imported with ``tokens=`` is comparable with an itda_lens
build on the same tokens.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.pursuit import UNIT_NORM_TOL
from itda_lens.saes.record import (
    BUILD_RECORD_KEY,
    PREFIX_SEQUENCES,
    BuildRecord,
    StreamRecord,
    prefix_digest,
)

ATOMS_FILE, LABELS_FILE, METADATA_FILE = "atoms.pt", "atom_indices.pt", "metadata.yaml"
#: metadata key holding the reference's own metadata.yaml, kept verbatim for export
REFERENCE_KEY = "itda_reference"
#: the reference loader's default when metadata.yaml has no k
REFERENCE_DEFAULT_K = 40


def cos_threshold_from_tau(tau: float, d_model: int) -> float:
    """Convert the reference code's ``loss_threshold`` tau (normalised per-dimension MSE) to ours:
    it adds x when ``mean((x/|x| - x_hat/|x_hat|)^2) = (2 - 2 cos) / d > tau``."""
    cos = 1.0 - tau * d_model / 2.0
    if cos <= -1.0:
        raise ValueError(
            f"tau={tau} with d_model={d_model} can never add an atom (needs tau < {4 / d_model:.3g})"
        )
    return cos


def tau_from_cos_threshold(cos: float, d_model: int) -> float:
    """The inverse of :func:`cos_threshold_from_tau`."""
    return (2.0 - 2.0 * cos) / d_model


def _load_tensor(path: Path) -> Tensor:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} is not a reference ITDA folder: {path.name} is missing (it needs "
            f"{ATOMS_FILE}, {LABELS_FILE} and {METADATA_FILE})"
        )
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"corrupt {path}: not a torch.save'd tensor ({str(err).splitlines()[0][:200]})"
        ) from err
    if not isinstance(value, Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value


def _read_metadata(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} is not a reference ITDA folder: {path.name} is missing"
        )
    try:
        meta = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {path}: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must be a YAML mapping, got {type(meta).__name__}")
    return meta


def _number(meta: Mapping[str, Any], key: str, kind: type, where: Path) -> Any:
    value = meta.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    if not ok:
        raise ValueError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return kind(value)


def _jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata's scalar entries (what cfg.json can hold)."""
    return {
        str(k): v for k, v in meta.items() if v is None or isinstance(v, str | int | float | bool)
    }


def _stream_tag(meta: Mapping[str, Any]) -> str:
    """Stands in for the stream's prefix hash when the tokens are not given: the reference's
    stream is fixed by the model's tokenizer, the dataset and the window length."""
    key = f"{meta.get('lm_name')}|{meta.get('dataset')}|{meta.get('seq_len')}"
    return "reference:" + hashlib.sha256(key.encode()).hexdigest()


class ReferenceDictionary(NamedTuple):
    """A reference folder's content, checked: what :meth:`ITDA.from_reference
    <itda_lens.ITDA.from_reference>` makes an ITDA of (``from_atoms`` arguments)."""

    atoms: Float[Tensor, "n d"]
    k: int
    labels: Int[Tensor, "n 2"]
    token_ids: Int[Tensor, " n"] | None
    hook_name: str
    model_name: str | None
    context_size: int
    dataset_path: str | None
    metadata: dict[str, Any]
    """The build record (as a dict) and the reference's own metadata (``REFERENCE_KEY``)."""


def read_reference(
    folder: str | Path,
    *,
    tokens: Int[Tensor, "n_seq seq"] | None = None,
    hook_name: str | None = None,
) -> ReferenceDictionary:
    """A reference folder (module doc), checked: its atoms as stored, ``k`` (40 when missing, as
    the reference loader does), the threshold converted with :func:`cos_threshold_from_tau` (in a
    build record), the labels as provenance and the rest of ``metadata.yaml`` kept for export.
    ``hook_name`` defaults to ``blocks.{layer}.hook_resid_post`` (the reference's TransformerLens
    hook); ``tokens`` (the reference's token stream, [sequences, seq_len]) fills in the atoms'
    token ids and fingerprints the stream."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no reference ITDA folder at {folder}")
    meta = _read_metadata(folder / METADATA_FILE)
    atoms = _load_tensor(folder / ATOMS_FILE)
    labels = _load_tensor(folder / LABELS_FILE)
    where = folder / METADATA_FILE
    if atoms.ndim != 2 or not atoms.is_floating_point() or atoms.shape[0] == 0:
        raise ValueError(
            f"{folder / ATOMS_FILE} must be a non-empty float [n_atoms, d_model] tensor, got "
            f"{atoms.dtype} {tuple(atoms.shape)}"
        )
    if not bool(torch.isfinite(atoms).all()):
        raise ValueError(f"{folder / ATOMS_FILE} contains NaN or Inf")
    norms = atoms.double().norm(dim=1)
    off = float((norms - 1).abs().max())
    if off > UNIT_NORM_TOL:
        raise ValueError(
            f"{folder / ATOMS_FILE}: the reference stores unit-norm atoms, but a row has norm "
            f"{float(norms[(norms - 1).abs().argmax()]):.4g}: not a reference dictionary"
        )
    n, d = atoms.shape
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{folder / LABELS_FILE} must hold integers, got {labels.dtype}")
    if tuple(labels.shape) != (n, 2):
        raise ValueError(
            f"{folder / LABELS_FILE} must be [{n}, 2] (sequence, position) for {n} atoms, got "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    if int(labels.min()) < 0:
        raise ValueError(f"{folder / LABELS_FILE} has negative (sequence, position) labels")
    k = _number(meta, "k", int, where) if meta.get("k") is not None else REFERENCE_DEFAULT_K
    tau = _number(meta, "loss_threshold", float, where)
    layer = _number(meta, "layer", int, where)
    seq_len = _number(meta, "seq_len", int, where)
    if meta.get("activation_dim") is not None and meta["activation_dim"] != d:
        raise ValueError(
            f"{where}: activation_dim is {meta['activation_dim']} but the atoms have d = {d}"
        )
    if int(labels[:, 1].max()) >= seq_len:
        raise ValueError(
            f"{folder / LABELS_FILE}: a token position reaches {int(labels[:, 1].max())}, "
            f"beyond seq_len={seq_len}"
        )
    cos = cos_threshold_from_tau(tau, d)
    token_ids = None
    prefix = _stream_tag(meta)
    if tokens is not None:
        if tokens.ndim != 2 or tokens.shape[1] != seq_len:
            raise ValueError(
                f"tokens must be the reference's stream, [sequences, seq_len={seq_len}], got "
                f"{tuple(tokens.shape)}"
            )
        if int(labels[:, 0].max()) >= tokens.shape[0]:
            raise ValueError(
                f"the labels reach sequence {int(labels[:, 0].max())} but tokens has "
                f"{tokens.shape[0]}: give the whole stream the reference read"
            )
        token_ids = tokens[labels[:, 0], labels[:, 1]].long()
        prefix = prefix_digest(tokens)
    batch = meta.get("batch_size")
    steps = meta.get("steps")
    n_seq = batch * steps if isinstance(batch, int) and isinstance(steps, int) else None
    config = {
        "k": k,
        "cos_threshold": cos,
        "add_rule": "batch",
        "batch_size": batch,
        "context_size": seq_len,
        "max_atoms": meta.get("max_dict_size"),
        "exclude_special_tokens": False,
        "encoder": "mp",
    }
    record = BuildRecord(
        hook_name=hook_name or f"blocks.{layer}.hook_resid_post",
        config=config,
        cos_threshold=cos,
        n_atoms=n,
        tokens_seen=n_seq * seq_len if n_seq is not None else 0,
        tokens_scored=n_seq * seq_len if n_seq is not None else 0,
        batches=steps if isinstance(steps, int) else 0,
        stop_reason=None,
        growth=[],
        dictionary_seconds=0.0,
        forward_seconds=0.0,
        stream=StreamRecord(
            sha256="",
            n_rows=n_seq * seq_len if n_seq is not None else 0,
            n_sequences=n_seq,
            context_size=seq_len,
            tokenizer=None,  # the reference records the model (lm_name), not a tokenizer name
            prefix_sha256=prefix,
            prefix_sequences=PREFIX_SEQUENCES if tokens is not None else None,
        ),
    )
    return ReferenceDictionary(
        atoms=atoms,
        k=k,
        labels=labels,
        token_ids=token_ids,
        hook_name=str(record.hook_name),
        model_name=meta.get("lm_name"),
        context_size=seq_len,
        dataset_path=meta.get("dataset"),
        metadata={BUILD_RECORD_KEY: record.to_dict(), REFERENCE_KEY: _jsonable(meta)},
    )


def write_reference(itda: Any, folder: str | Path, *, loss_threshold: float | None = None) -> Path:
    """Write ``itda`` as a reference folder (the three files), so the reference code's
    ``ITDA.from_pretrained`` reads it. Settings come from the imported ``metadata.yaml`` when the
    ITDA was read from one, else from its build record (tau from its threshold; give
    ``loss_threshold`` for a dictionary that records none). Refuses atoms without provenance."""
    import yaml

    labels = itda.atom_labels.cpu()
    if int(labels.min()) < 0:
        raise ValueError(
            "the reference format needs every atom's (sequence, position); this ITDA has atoms "
            "without provenance (label -1)"
        )
    meta_in = itda.cfg.metadata
    meta: dict[str, Any] = dict(meta_in.get(REFERENCE_KEY, None) or {})
    record = itda.build_record
    d = itda.cfg.d_in
    if loss_threshold is None and "loss_threshold" not in meta:
        if record is None or not math.isfinite(record.cos_threshold):
            raise ValueError(
                "this ITDA records no threshold (it was not built): pass loss_threshold= (the "
                "reference's tau)"
            )
        loss_threshold = tau_from_cos_threshold(record.cos_threshold, d)
    if loss_threshold is not None:
        meta["loss_threshold"] = float(loss_threshold)
    layer = meta_in.get("hook_layer", None)
    meta.setdefault("lm_name", meta_in.get("model_name", None))
    meta.setdefault("layer", layer)
    meta.setdefault("dataset", meta_in.get("dataset_path", None))
    meta.setdefault("seq_len", meta_in.get("context_size", None))
    if record is not None:
        meta.setdefault("batch_size", record.config.get("batch_size"))
        meta.setdefault("max_dict_size", record.config.get("max_atoms"))
    meta["k"] = itda.cfg.k
    meta["activation_dim"] = d
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from itda_lens.saes._io import atomic_write

    atoms = itda.W_dec.detach().cpu().clone()
    atomic_write(folder / ATOMS_FILE, lambda tmp: torch.save(atoms, tmp))
    atomic_write(folder / LABELS_FILE, lambda tmp: torch.save(labels.clone(), tmp))
    atomic_write(
        folder / METADATA_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(meta, sort_keys=False))
    )
    return folder


__all__ = [
    "REFERENCE_KEY",
    "ReferenceDictionary",
    "cos_threshold_from_tau",
    "read_reference",
    "tau_from_cos_threshold",
    "write_reference",
]
