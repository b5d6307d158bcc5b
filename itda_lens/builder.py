"""The greedy ITDA loop: stream activations, encode them against the current dictionary, and add
the ones that the pursuit reconstructs poorly.

Rule (per batch, all tokens scored against the dictionary as it stood at the start of the batch):
an eligible activation is a *candidate* when ``cos(x, x_hat) < cos_threshold``, ``x_hat`` being its
``k``-step pursuit reconstruction. Candidates are then taken in stream order, and one is skipped
when an atom accepted earlier in the same batch has ``|cos| >= cos_threshold`` with it: that atom
alone would already lift its reconstruction above the threshold (MP's first step takes the most
correlated atom, and the k-step reconstruction is at least as close in angle). So near-duplicates
inside one batch are not all added, which the reference code does.

The reference code thresholds ``mean((x/|x| - x_hat/|x_hat|)^2) = (2 - 2 cos) / d`` at ``tau``;
that is ``cos < 1 - tau * d / 2`` (see :func:`cos_threshold_from_tau`).

Builds are deterministic; checkpoints are single files written atomically, and a resumed build
replays the checkpointed dictionary (and its Gram matrix) bit for bit, so it ends with the same
dictionary as an uninterrupted run on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens.dictionary import AtomStore
from itda_lens.pursuit import decode, matching_pursuit, orthogonal_matching_pursuit
from itda_lens.sae import ITDA
from itda_lens.sources import (
    TokenInput,
    check_hook_names,
    excluded_token_ids,
    hook_activations,
    stop_at_layer,
    token_batches,
)

CHECKPOINT_FILE = "itda_checkpoint.safetensors"
#: Sequences whose hash identifies a token stream (``token_stream.prefix_sha256``), for similarity.
PREFIX_SEQUENCES = 16
_CHECKPOINT_VERSION = 1


def cos_threshold_from_tau(tau: float, d_model: int) -> float:
    """Convert the reference code's ``loss_threshold`` tau (normalised per-dimension MSE) to ours."""
    cos = 1.0 - tau * d_model / 2.0
    if cos <= -1.0:
        raise ValueError(
            f"tau={tau} with d_model={d_model} can never add an atom (needs tau < {4 / d_model:.3g})"
        )
    return cos


@dataclass(frozen=True)
class BuildSettings:
    """What decides which activations become atoms."""

    k: int = 40
    cos_threshold: float = 0.8
    max_atoms: int | None = None
    encoder: Literal["mp", "omp"] = "mp"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if not (isinstance(self.cos_threshold, int | float) and 0.0 < self.cos_threshold <= 1.0):
            raise ValueError(
                f"cos_threshold must be in (0, 1], got {self.cos_threshold!r} "
                "(for the reference code's tau use cos_threshold_from_tau)"
            )
        if self.max_atoms is not None and (isinstance(self.max_atoms, bool) or self.max_atoms < 1):
            raise ValueError(f"max_atoms must be >= 1 or None, got {self.max_atoms!r}")
        if self.encoder not in ("mp", "omp"):
            raise ValueError(f"encoder must be 'mp' or 'omp', got {self.encoder!r}")


class ActivationBatch(NamedTuple):
    """Activations [n, d] with provenance; ``eligible`` marks rows allowed to become atoms."""

    acts: Float[Tensor, "n d"]
    labels: Int[Tensor, "n 2"]
    token_ids: Int[Tensor, " n"]
    eligible: Bool[Tensor, " n"]


@dataclass
class ITDABuilder:
    """Greedy dictionary state for one hook point: feed it batches with :meth:`update`."""

    d_in: int
    settings: BuildSettings = field(default_factory=BuildSettings)
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    store: AtomStore = field(init=False)
    tokens_seen: int = 0
    tokens_scored: int = 0
    n_batches: int = 0
    growth: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.store = AtomStore(self.d_in, device=self.device, dtype=self.dtype)

    @property
    def full(self) -> bool:
        return self.settings.max_atoms is not None and len(self.store) >= self.settings.max_atoms

    @property
    def idle_tokens(self) -> int:
        """Tokens read since the last atom was added (all tokens read, if none was)."""
        return self.tokens_seen - (self.growth[-1][0] if self.growth and self.growth[-1][1] else 0)

    def update(self, batch: ActivationBatch) -> int:
        """Score one batch and add its accepted activations; returns the number added."""
        start = time.perf_counter()
        acts = batch.acts
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(
                f"d_in mismatch: expected activations [n, {self.d_in}], got {tuple(acts.shape)}"
            )
        if not bool(torch.isfinite(acts).all()):
            raise ValueError(f"activations contain NaN or Inf (batch {self.n_batches})")
        self.tokens_seen += acts.shape[0]
        self.n_batches += 1
        added = 0
        if not self.full:
            x = acts.to(self.store.device, self.dtype)
            keep = batch.eligible.to(x.device) & (
                x.norm(dim=1) > 0
            )  # zero vectors never become atoms
            x, labels, tids = (
                x[keep],
                batch.labels.to(x.device)[keep],
                batch.token_ids.to(x.device)[keep],
            )
            self.tokens_scored += x.shape[0]
            cand = self._candidates(x)
            limit = (
                math.inf
                if self.settings.max_atoms is None
                else self.settings.max_atoms - len(self.store)
            )
            sel = cand[
                _greedy_distinct(F.normalize(x[cand], dim=1), self.settings.cos_threshold, limit)
            ]
            self.store.add(x[sel], labels[sel], tids[sel])
            added = sel.numel()
        if added or not self.growth:
            self.growth.append((self.tokens_seen, len(self.store)))
        self.seconds += time.perf_counter() - start
        return added

    def _candidates(self, x: Float[Tensor, "n d"]) -> Int[Tensor, " c"]:
        if len(self.store) == 0 or x.shape[0] == 0:
            return torch.arange(x.shape[0], device=x.device)
        atoms = self.store.atoms
        recon = self._reconstruct(x, atoms)
        cos = F.cosine_similarity(x, recon, dim=1, eps=1e-30)
        return (cos < self.settings.cos_threshold).nonzero().flatten()

    def _reconstruct(
        self, x: Float[Tensor, "n d"], atoms: Float[Tensor, "m d"]
    ) -> Float[Tensor, "n d"]:
        fn = matching_pursuit if self.settings.encoder == "mp" else orthogonal_matching_pursuit
        # the incrementally grown Gram while it fits; past that, residual updates
        gram = self.store.gram if self.store.gram is not None else "auto"
        return decode(fn(x, atoms, self.settings.k, gram=gram), atoms)

    def to_itda(self, **from_atoms_kwargs: Any) -> ITDA:
        """The dictionary as an ITDA (an sae_lens SAE)."""
        if len(self.store) == 0:
            raise ValueError(
                "empty dictionary: no activation was eligible to become an atom "
                "(all inputs were excluded tokens or zero vectors?)"
            )
        return ITDA.from_atoms(
            self.store.atoms,
            self.settings.k,
            labels=self.store.labels,
            token_ids=self.store.token_ids,
            encoder=self.settings.encoder,
            dtype=self.dtype,
            **from_atoms_kwargs,
        )

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self.settings),
            "n_atoms": len(self.store),
            "tokens_seen": self.tokens_seen,
            "tokens_scored": self.tokens_scored,
            "batches": self.n_batches,
            # (tokens read, atoms) at every batch that added atoms, and at the end
            "growth": [list(p) for p in self.growth]
            + (
                [[self.tokens_seen, len(self.store)]]
                if self.growth and self.growth[-1][0] != self.tokens_seen
                else []
            ),
            "dictionary_seconds": round(self.seconds, 3),
        }


def _greedy_distinct(
    units: Float[Tensor, "c d"], threshold: float, limit: float, block: int = 2048
) -> Int[Tensor, " s"]:
    """Indices of candidates kept in order, skipping any with |cos| >= threshold to one kept before."""
    kept: list[int] = []
    kept_units = units[:0]
    for start in range(0, units.shape[0], block):
        if len(kept) >= limit:
            break
        u = units[start : start + block]
        alive = np.ones(u.shape[0], dtype=bool)
        if kept_units.shape[0]:
            alive &= ((u @ kept_units.T).abs() < threshold).all(dim=1).cpu().numpy()
        close = ((u @ u.T).abs() >= threshold).cpu().numpy()
        new: list[int] = []
        for i in np.flatnonzero(alive):
            if not alive[i]:
                continue
            new.append(int(i))
            if len(kept) + len(new) >= limit:
                break
            alive &= ~close[i]
        kept.extend(start + i for i in new)
        kept_units = torch.cat([kept_units, u[new]])
    return torch.tensor(kept, dtype=torch.long, device=units.device)


# --- the streaming loop, shared by build_itda and build_itda_from_activations ---------------


class _Checkpointer:
    """One atomic ``itda_checkpoint.safetensors`` holding every hook's dictionary and the progress."""

    def __init__(self, folder: str | Path | None, every: int):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = Path(folder) / CHECKPOINT_FILE if folder is not None else None
        self.every = every

    def load(self, resume: bool) -> dict[str, Any] | None:
        if self.path is None:
            if resume:
                raise ValueError("resume=True needs checkpoint_dir")
            return None
        if not self.path.exists():
            return None
        if not resume:
            raise FileExistsError(
                f"{self.path} already holds a build checkpoint; pass resume=True to continue it, "
                "or use another checkpoint_dir"
            )
        try:
            with safe_open(str(self.path), framework="pt") as f:
                state = json.loads(f.metadata()["state"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise ValueError(f"corrupt build checkpoint {self.path}: {err}") from err
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"{self.path} was written by an incompatible itda_lens version")
        state["tensors"] = tensors
        return state

    def save(self, state: dict[str, Any], builders: dict[str, ITDABuilder]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        hooks = {}
        for i, (hook, b) in enumerate(builders.items()):
            tensors[f"{i}.atoms"] = b.store.atoms.contiguous().cpu()
            tensors[f"{i}.labels"] = b.store.labels.contiguous().cpu()
            tensors[f"{i}.token_ids"] = b.store.token_ids.contiguous().cpu()
            hooks[hook] = {
                "index": i,
                "d_in": b.d_in,
                "blocks": b.store.blocks,
                "tokens_seen": b.tokens_seen,
                "tokens_scored": b.tokens_scored,
                "n_batches": b.n_batches,
                "growth": b.growth,
                "seconds": b.seconds,
            }
        meta = {"state": json.dumps({**state, "version": _CHECKPOINT_VERSION, "hooks": hooks})}
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _restore_builders(
    state: dict[str, Any], settings: BuildSettings, device: Any, dtype: torch.dtype
) -> dict[str, ITDABuilder]:
    builders = {}
    tensors = state["tensors"]
    for hook, h in state["hooks"].items():
        b = ITDABuilder(h["d_in"], settings, device=device, dtype=dtype)
        i = h["index"]
        b.store = AtomStore.restore(
            tensors[f"{i}.atoms"],
            tensors[f"{i}.labels"],
            tensors[f"{i}.token_ids"],
            h["blocks"],
            device=device,
            dtype=dtype,
        )
        b.tokens_seen, b.tokens_scored, b.n_batches = (
            h["tokens_seen"],
            h["tokens_scored"],
            h["n_batches"],
        )
        b.growth = [tuple(p) for p in h["growth"]]
        b.seconds = h["seconds"]
        builders[hook] = b
    return builders


def _digest(prev: str, t: Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(prev.encode() + hashlib.sha256(data).digest()).hexdigest()


@dataclass
class _Stream:
    """How one kind of input becomes builder updates."""

    raw: Iterator[Any]
    to_updates: (
        Any  # (raw, seq_offset) -> (dict[hook, ActivationBatch], n_sequences, forward_seconds)
    )
    key: Any  # raw -> tensor hashed for the stream fingerprint
    total: int | None
    first_tokens: Any = None  # raw -> first token of each sequence (for prepend_bos), if tokens


def _run(
    stream: _Stream,
    settings: BuildSettings,
    fingerprint: dict[str, Any],
    *,
    device: Any,
    dtype: torch.dtype,
    checkpoint_dir: str | Path | None,
    checkpoint_every: int,
    resume: bool,
    max_tokens: int | None,
    progress: bool,
    patience_tokens: int | None = None,
) -> tuple[dict[str, ITDABuilder], dict[str, Any]]:
    if patience_tokens is not None and patience_tokens < 1:
        raise ValueError(f"patience_tokens must be >= 1 or None, got {patience_tokens}")
    ckpt = _Checkpointer(checkpoint_dir, checkpoint_every)
    saved = ckpt.load(resume)
    builders: dict[str, ITDABuilder] = {}
    state: dict[str, Any] = {
        "fingerprint": fingerprint,
        "batches": 0,
        "sequences": 0,
        "tokens": 0,
        "stream_sha256": "",
        "forward_seconds": 0.0,
        "finished": False,
        "first_column": [],
    }
    if saved is not None:
        if saved["fingerprint"] != fingerprint:
            diff = {
                k: (saved["fingerprint"].get(k), v)
                for k, v in fingerprint.items()
                if saved["fingerprint"].get(k) != v
            }
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} was written with other settings (saved, now): {diff}"
            )
        builders = _restore_builders(saved, settings, device or "cpu", dtype)
        state.update({k: saved[k] for k in state if k in saved})
    skip, target_sha, running_sha = state["batches"], state["stream_sha256"], ""
    bar = tqdm(
        total=stream.total, desc="ITDA build", unit="batch", disable=not progress, initial=skip
    )
    t0 = time.perf_counter()
    seen_now = 0
    i = -1
    prefix: list[Tensor] = []  # the first sequences, fingerprinted for label compatibility
    try:
        for i, raw in enumerate(stream.raw):
            if stream.first_tokens is not None and sum(map(len, prefix)) < PREFIX_SEQUENCES:
                prefix.append(raw[: PREFIX_SEQUENCES - sum(map(len, prefix))])
            if i < skip:
                running_sha = _digest(running_sha, stream.key(raw))
                if i == skip - 1 and running_sha != target_sha:
                    raise ValueError(
                        "resume: the input differs from the one the checkpoint was built from"
                    )
                continue
            if state["finished"]:
                break
            running_sha = _digest(running_sha, stream.key(raw))
            updates, n_seq, fwd = stream.to_updates(raw, state["sequences"])
            state["forward_seconds"] += fwd
            if i == 0 and stream.first_tokens is not None:
                state["first_column"] = stream.first_tokens(raw)
            for hook, batch in updates.items():
                if hook not in builders:
                    builders[hook] = ITDABuilder(
                        batch.acts.shape[1],
                        settings,
                        device=device or batch.acts.device,
                        dtype=dtype,
                    )
                builders[hook].update(batch)
            n_tok = next(iter(updates.values())).acts.shape[0]
            state["sequences"] += n_seq
            state["tokens"] += n_tok
            state["batches"] = i + 1
            state["stream_sha256"] = running_sha
            seen_now += n_tok
            done = all(
                b.full or (patience_tokens is not None and b.idle_tokens >= patience_tokens)
                for b in builders.values()
            ) or (max_tokens is not None and state["tokens"] >= max_tokens)
            bar.update(1)
            bar.set_postfix(
                atoms=",".join(str(len(b.store)) for b in builders.values()),
                tok_s=f"{seen_now / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
            if done:
                state["finished"] = True
            if done or state["batches"] % ckpt.every == 0:
                ckpt.save(state, builders)
            if done:
                break
    finally:
        bar.close()
    if i + 1 < skip:
        raise ValueError(
            f"resume: the input has {i + 1} batches but the checkpoint already consumed {skip}"
        )
    state["prefix_sha256"] = _digest("", torch.cat(prefix)) if prefix else None
    if not state["finished"]:
        state["finished"] = True
        ckpt.save(state, builders)
    if not builders:
        raise ValueError("no activations: the input yielded no batches")
    return builders, state


def _model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                h.update(
                    f"{name}:{tuple(p.shape)}:{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}".encode()
                )
    return h.hexdigest()


def build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str | Sequence[str],
    *,
    k: int = 40,
    cos_threshold: float = 0.8,
    max_atoms: int | None = None,
    encoder: Literal["mp", "omp"] = "mp",
    batch_size: int = 32,
    context_size: int | None = None,
    max_tokens: int | None = None,
    patience_tokens: int | None = None,
    exclude_token_ids: Sequence[int] | Literal["auto"] | None = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
) -> ITDA | dict[str, ITDA]:
    """Build ITDA dictionaries at one or more hook points of a TransformerLens model.

    ``tokens``: a LongTensor [n_seq, seq_len], an iterable of such batches, or a HF ``datasets``
    dataset with a ``tokens``/``input_ids`` column (rows cut to ``context_size``) or a ``text``
    column (packed into BOS-separated windows as sae_lens's ActivationsStore does). All hooks share
    one forward pass that stops after the deepest one. The build reads its whole input unless
    ``max_tokens`` is reached, every dictionary holds ``max_atoms``, or every dictionary went
    ``patience_tokens`` tokens without a new atom (it has converged). BOS and PAD positions never become atoms
    unless ``exclude_token_ids=None``. Returns one ITDA, or ``{hook: ITDA}`` for a list of hooks.
    """
    hooks = [hook_name] if isinstance(hook_name, str) else list(hook_name)
    check_hook_names(model, hooks)
    settings = BuildSettings(k=k, cos_threshold=cos_threshold, max_atoms=max_atoms, encoder=encoder)
    excluded = torch.tensor(excluded_token_ids(model, exclude_token_ids), dtype=torch.long)
    stop = stop_at_layer(hooks)
    tokenizer = getattr(model, "tokenizer", None)
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    model_device = getattr(getattr(model, "cfg", None), "device", None) or "cpu"
    device = device if device is not None else model_device

    def to_updates(toks: Tensor, offset: int) -> tuple[dict[str, ActivationBatch], int, float]:
        if d_vocab is not None and (int(toks.max()) >= d_vocab or int(toks.min()) < 0):
            raise ValueError(
                f"token ids must lie in [0, {d_vocab}); got range [{int(toks.min())}, {int(toks.max())}]"
            )
        t0 = time.perf_counter()
        acts = hook_activations(model, toks, hooks, stop)
        fwd = time.perf_counter() - t0
        b, s = toks.shape
        seq = torch.arange(offset, offset + b).repeat_interleave(s)
        pos = torch.arange(s).repeat(b)
        labels = torch.stack([seq, pos], dim=1)
        flat = toks.reshape(-1).cpu()
        eligible = ~torch.isin(flat, excluded)
        return (
            {
                h: ActivationBatch(a.reshape(b * s, -1), labels, flat, eligible)
                for h, a in acts.items()
            },
            b,
            fwd,
        )

    total = None
    if isinstance(tokens, Tensor) and tokens.ndim == 2:
        total = math.ceil(tokens.shape[0] / batch_size)
    elif (
        hasattr(tokens, "column_names")
        and hasattr(tokens, "__len__")
        and "text" not in tokens.column_names
    ):
        total = math.ceil(len(tokens) / batch_size)
    fingerprint = {
        **asdict(settings),
        "hooks": hooks,
        "batch_size": batch_size,
        "context_size": context_size,
        "max_tokens": max_tokens,
        "patience_tokens": patience_tokens,
        "excluded_token_ids": excluded.tolist(),
        "dtype": str(dtype),
        "model": _model_fingerprint(model),
    }
    stream = _Stream(
        token_batches(tokens, batch_size, context_size=context_size, tokenizer=tokenizer),
        to_updates,
        key=lambda t: t,
        total=total,
        first_tokens=lambda t: t[:, 0].tolist(),
    )
    builders, state = _run(
        stream,
        settings,
        fingerprint,
        device=device,
        dtype=dtype,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        max_tokens=max_tokens,
        progress=progress,
        patience_tokens=patience_tokens,
    )
    bos = getattr(tokenizer, "bos_token_id", None)
    first = state["first_column"]
    seq_len = state["tokens"] // max(1, state["sequences"])
    common = {
        "model_name": model_name or getattr(getattr(model, "cfg", None), "model_name", None),
        "context_size": seq_len,
        "prepend_bos": bool(first) and bos is not None and all(t == bos for t in first),
        "dataset_path": dataset_path,
    }
    stream_meta = {
        "sha256": state["stream_sha256"],
        "n_sequences": state["sequences"],
        "context_size": seq_len,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "batch_size": batch_size,
        "prefix_sha256": state["prefix_sha256"],
        "prefix_sequences": PREFIX_SEQUENCES,
    }
    out = {
        h: b.to_itda(
            hook_name=h,
            **common,
            metadata={
                "itda_builder": {
                    **b.summary(),
                    "forward_seconds": round(state["forward_seconds"], 3),
                    "batch_size": batch_size,
                    "excluded_token_ids": excluded.tolist(),
                },
                "token_stream": stream_meta,
            },
        )
        for h, b in builders.items()
    }
    return out[hooks[0]] if isinstance(hook_name, str) else out


def build_itda_from_activations(
    batches: Iterable[Tensor | tuple[Tensor, ...]],
    *,
    k: int = 40,
    cos_threshold: float = 0.8,
    max_atoms: int | None = None,
    encoder: Literal["mp", "omp"] = "mp",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> ITDA:
    """The same greedy build over any iterable of activations (HF / nnsight models, disk caches).

    Each item is ``acts [n, d]``, or ``(acts, labels [n, 2])``, or ``(acts, labels, token_ids [n])``.
    Without labels an activation is labelled ``(its row in the stream, -1)``.
    """
    settings = BuildSettings(k=k, cos_threshold=cos_threshold, max_atoms=max_atoms, encoder=encoder)

    def parse(item: Any, offset: int) -> tuple[dict[str, ActivationBatch], int, float]:
        acts, labels, tids = (
            (item, None, None) if isinstance(item, Tensor) else (*tuple(item), None, None)[:3]
        )
        if not isinstance(acts, Tensor) or not acts.is_floating_point() or acts.ndim != 2:
            raise ValueError("each activation batch must be a float tensor [n_tokens, d]")
        n = acts.shape[0]
        if labels is None:
            labels = torch.stack([torch.arange(offset, offset + n), torch.full((n,), -1)], dim=1)
        labels = torch.as_tensor(labels)
        if labels.shape != (n, 2) or labels.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor [{n}, 2], got {tuple(labels.shape)} {labels.dtype}"
            )
        tids = (
            torch.full((n,), -1, dtype=torch.long) if tids is None else torch.as_tensor(tids).long()
        )
        return (
            {
                "activations": ActivationBatch(
                    acts, labels.long(), tids, torch.ones(n, dtype=torch.bool)
                )
            },
            n,
            0.0,
        )

    total = len(batches) if hasattr(batches, "__len__") else None
    stream = _Stream(
        iter(batches),
        parse,
        key=lambda item: item if isinstance(item, Tensor) else item[0],
        total=total,
    )
    fingerprint = {**asdict(settings), "dtype": str(dtype)}
    builders, state = _run(
        stream,
        settings,
        fingerprint,
        device=device,
        dtype=dtype,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        max_tokens=None,
        progress=progress,
    )
    b = builders["activations"]
    meta = {
        "itda_builder": b.summary(),
        "token_stream": {"sha256": state["stream_sha256"], "n_rows": state["sequences"]},
    }
    return b.to_itda(metadata={**meta, **(metadata or {})})
