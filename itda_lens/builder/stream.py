"""The streaming build: read batches in stream order, feed every hook's :class:`ITDABuilder`,
checkpoint, resume, and stop on a token budget or when every dictionary is full or converged.

``build_itda`` reads token batches through a TransformerLens model; ``build_itda_from_activations``
reads activations the caller already has. Both run the same loop (:func:`run_stream`), whose state
between batches is the typed :class:`BuildProgress`. A resumed build replays the checkpointed
dictionaries bit for bit and checks that the batches it skips are the ones the checkpoint read.
A build holds its checkpoint folder's lock from start to end: a second build into the same folder
fails at once with :class:`~itda_lens.builder.checkpoint.CheckpointLockedError`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens.activations import (
    TokenInput,
    check_hook_names,
    excluded_token_ids,
    read_batch,
    token_batches,
)
from itda_lens.budget import default_device
from itda_lens.builder.checkpoint import Checkpointer, locked
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.distributed import (
    Comm,
    dictionary_digest,
    distributed_read,
    empty_like,
    shard,
)
from itda_lens.builder.refine import prune_by_energy
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.builder.target import ThresholdSearch, find_threshold
from itda_lens.saes import ITDA

#: Sequences whose hash identifies a token stream (``token_stream.prefix_sha256``), for similarity.
PREFIX_SEQUENCES = 16

#: (raw batch, sequences before it) -> ({hook: ActivationBatch}, sequences in it, forward seconds)
ToUpdates = Callable[[Any, int], tuple[dict[str, ActivationBatch], int, float]]

F = TypeVar("F", bound=Callable[..., Any])


def _holding_checkpoint_lock(build: F) -> F:
    """Run ``build`` holding the lock of its ``checkpoint_dir=`` (if any) from its first line, so
    that a second build into that folder fails before reading anything."""

    @functools.wraps(build)
    def locked_build(*args: Any, **kwargs: Any) -> Any:
        with locked(kwargs.get("checkpoint_dir")):
            return build(*args, **kwargs)

    return locked_build  # type: ignore[return-value]


@dataclass
class BuildProgress:
    """Where a build is in its stream; checkpointed with the dictionaries."""

    fingerprint: dict[str, Any]
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    stream_sha256: str = ""
    forward_seconds: float = 0.0
    finished: bool = False
    first_column: list[int] = field(default_factory=list)
    context_size: int | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    prefix_sha256: str | None = None
    wire_bytes: int = (
        0  # candidates sent (data-parallel builds): by this rank; all ranks at the end
    )


@dataclass
class Stream:
    """How one kind of input becomes builder updates."""

    raw: Iterator[Any]
    to_updates: ToUpdates
    key: Callable[[Any], Tensor]  # raw -> tensor hashed for the stream fingerprint
    total: int | None
    first_tokens: Callable[[Any], list[int]] | None = None  # token inputs: first token per row
    size: Callable[[Any], int] = len  # rows (sequences, or activations) in a raw batch
    rows: Callable[[Any, int, int], Any] = lambda raw, lo, hi: raw[lo:hi]  # a shard of one


def _digest(prev: str, t: Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(prev.encode() + hashlib.sha256(data).digest()).hexdigest()


def prefix_digest(tokens: Tensor) -> str:
    """The fingerprint a build records of a token stream's first sequences (``prefix_sha256``)."""
    return _digest("", tokens[:PREFIX_SEQUENCES])


def _cut(updates: dict[str, ActivationBatch], n: int) -> dict[str, ActivationBatch]:
    return {h: b.head(n) for h, b in updates.items()}


def run_stream(
    stream: Stream,
    cfg: BuildConfig,
    fingerprint: dict[str, Any],
    *,
    device: Any,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    thresholds: dict[str, float] | None = None,
) -> tuple[dict[str, ITDABuilder], BuildProgress]:
    """Feed the stream to one builder per hook until it ends, the token budget is spent, or every
    builder is full or converged. ``thresholds`` overrides ``cos_threshold`` per hook."""
    with locked(checkpoint_dir):  # re-entrant: build_itda already holds it
        return _run_stream(
            stream, cfg, fingerprint, device, checkpoint_dir, resume, progress, thresholds
        )


def _run_stream(
    stream: Stream,
    cfg: BuildConfig,
    fingerprint: dict[str, Any],
    device: Any,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    thresholds: dict[str, float] | None,
) -> tuple[dict[str, ITDABuilder], BuildProgress]:
    thresholds = thresholds or {}
    comm = Comm.current()
    if comm is not None and cfg.batch_size % comm.world:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not divide among {comm.world} ranks: every rank "
            "reads an equal shard of each batch; use a multiple of the world size"
        )
    ckpt = Checkpointer(checkpoint_dir if comm is None or comm.rank == 0 else None)
    state = BuildProgress(fingerprint, thresholds=dict(thresholds))
    builders: dict[str, ITDABuilder] = {}

    def hook_cfg(hook: str) -> BuildConfig:
        return cfg.replace(cos_threshold=thresholds[hook]) if hook in thresholds else cfg

    if comm is None:
        saved = ckpt.load(resume, cfg, device or "cpu")
    else:  # rank 0 reads the checkpoint, every rank resumes from it (or fails with its error)
        saved, error = None, None
        if comm.rank == 0:
            try:
                saved = ckpt.load(resume, cfg, device or "cpu")
            except (ValueError, OSError) as err:
                error = err
        comm.agree("the build settings and model", fingerprint)
        saved, error = comm.broadcast((saved, error))
        if error is not None:
            raise error
    if saved is not None:
        fields_, builders = saved
        if fields_["fingerprint"] != fingerprint:
            diff = {
                k: (fields_["fingerprint"].get(k), v)
                for k, v in fingerprint.items()
                if fields_["fingerprint"].get(k) != v
            }
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} was written with other settings (saved, now): {diff}"
            )
        state = BuildProgress(**fields_)
        for hook, b in builders.items():
            b.cfg = hook_cfg(hook)
    skip, target_sha, running_sha = state.batches, state.stream_sha256, ""
    show = progress and (comm is None or comm.rank == 0)
    bar = tqdm(total=stream.total, desc="ITDA build", unit="batch", disable=not show, initial=skip)
    t0, seen_now, i = time.perf_counter(), 0, -1
    prefix: list[Tensor] = []  # the first sequences, fingerprinted for label compatibility
    try:
        for i, raw in enumerate(stream.raw):
            if stream.first_tokens is not None and sum(map(len, prefix)) < PREFIX_SEQUENCES:
                prefix.append(raw[: PREFIX_SEQUENCES - sum(map(len, prefix))])
            running_sha = _digest(running_sha, stream.key(raw))
            if i < skip:
                if i == skip - 1 and running_sha != target_sha:
                    raise ValueError(
                        "resume: the input differs from the one the checkpoint was built from"
                    )
                continue
            if state.finished:
                break
            if i == 0 and stream.first_tokens is not None:
                state.first_column = stream.first_tokens(raw)
                state.context_size = int(raw.shape[1])
            n_seq = stream.size(raw)
            lo, hi = (0, n_seq) if comm is None else shard(n_seq, comm.world, comm.rank)
            if hi > lo:
                updates, _, fwd = stream.to_updates(stream.rows(raw, lo, hi), state.sequences + lo)
            elif builders:  # a short last batch leaves this rank's shard empty
                updates, fwd = {h: empty_like(b, device) for h, b in builders.items()}, 0.0
            else:
                raise ValueError(f"the first batch has {n_seq} rows, fewer than {comm.world} ranks")
            state.forward_seconds += fwd
            local = next(iter(updates.values())).acts.shape[0]
            counts = [local] if comm is None else comm.gather(local)
            offset, n_rows = sum(counts[: comm.rank if comm else 0]), sum(counts)
            n_tok = n_rows
            if cfg.max_tokens is not None and state.tokens + n_tok > cfg.max_tokens:
                n_tok = cfg.max_tokens - state.tokens
                n_seq = math.ceil(n_seq * n_tok / n_rows)
                updates = _cut(updates, max(0, min(local, n_tok - offset)))
            for hook, batch in updates.items():
                if hook not in builders:
                    builders[hook] = ITDABuilder(
                        batch.acts.shape[1], hook_cfg(hook), device=device or batch.acts.device
                    )
                if comm is None:
                    builders[hook].update(batch)
                else:
                    state.wire_bytes += distributed_read(
                        builders[hook], batch, comm, offset, n_tok
                    )[1]
            state.sequences += n_seq
            state.tokens += n_tok
            state.batches = i + 1
            state.stream_sha256 = running_sha
            seen_now += n_tok
            done = all(b.stopped for b in builders.values()) or (
                cfg.max_tokens is not None and state.tokens >= cfg.max_tokens
            )
            bar.update(1)
            bar.set_postfix(
                atoms=",".join(str(len(b.store)) for b in builders.values()),
                tok_s=f"{seen_now / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
            state.finished = done
            if done or state.batches % cfg.checkpoint_every == 0:
                ckpt.save(asdict(state), builders)
            if done:
                break
    finally:
        bar.close()
    if i + 1 < skip:
        raise ValueError(
            f"resume: the input has {i + 1} batches but the checkpoint already consumed {skip}"
        )
    if not builders:
        raise ValueError("no activations: the input yielded no batches")
    state.prefix_sha256 = prefix_digest(torch.cat(prefix)) if prefix else None
    if comm is not None:
        for hook, b in builders.items():
            comm.agree(f"the dictionary at {hook}", dictionary_digest(b))
        state.wire_bytes = sum(comm.gather(state.wire_bytes))
    if not state.finished:
        state.finished = True
        ckpt.save(asdict(state), builders)
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


def _config(cfg: BuildConfig | None, overrides: dict[str, Any]) -> BuildConfig:
    return (cfg or BuildConfig()).replace(**overrides) if overrides else (cfg or BuildConfig())


def _read_sample(
    raw: Iterator[Any], to_updates: ToUpdates, cfg: BuildConfig
) -> tuple[list[Any], dict[str, Tensor]]:
    """The stream's first ``target_sample_tokens`` tokens (at most ``max_tokens``): the raw batches
    read (to be streamed again) and, per hook, the activations allowed to become atoms."""
    budget = min(cfg.max_tokens or cfg.target_sample_tokens, cfg.target_sample_tokens)
    head: list[Any] = []
    parts: dict[str, list[Tensor]] = {}
    read = sequences = 0
    while read < budget and (item := next(raw, None)) is not None:
        head.append(item)
        updates, n_seq, _ = to_updates(item, sequences)
        sequences += n_seq
        n = min(next(iter(updates.values())).acts.shape[0], budget - read)
        read += n
        for hook, b in _cut(updates, n).items():
            parts.setdefault(hook, []).append(b.acts[b.eligible])
    if not head:
        raise ValueError("no activations: the input yielded no batches")
    return head, {h: torch.cat(p) for h, p in parts.items()}


class _Sizing:
    """``target_atoms``: the threshold per hook found on a sample of the stream, and the optional
    energy refinement that prunes the (wider) built dictionary back to the target on that sample."""

    def __init__(self, raw: Iterator[Any], to_updates: ToUpdates, cfg: BuildConfig):
        self.cfg = cfg
        self.searches: dict[str, ThresholdSearch] = {}
        self.samples: dict[str, Tensor] = {}
        self.raw = raw
        if cfg.atoms_to_build is not None:
            head, self.samples = _read_sample(raw, to_updates, cfg)
            self.searches = {
                h: find_threshold(x, cfg, cfg.atoms_to_build) for h, x in self.samples.items()
            }
            self.raw = itertools.chain(head, raw)

    @property
    def thresholds(self) -> dict[str, float]:
        return {h: s.threshold for h, s in self.searches.items()}

    def metadata(self, hook: str) -> dict[str, Any]:
        search = self.searches.get(hook)
        if search is None:
            return {}
        return {
            "target_atoms": self.cfg.target_atoms,
            "threshold_search": {
                "threshold": search.threshold,
                "target": search.target,
                "sample_tokens": search.sample_rows,
                "atoms_on_sample": search.atoms,
                "steps": [list(p) for p in search.history],
                "seconds": round(search.seconds, 3),
            },
        }

    def finish(self, hook: str, itda: ITDA) -> ITDA:
        """The built ITDA, pruned to ``target_atoms`` when refining (and wider than that)."""
        target = self.cfg.target_atoms
        if self.cfg.refine == "none" or target is None or itda.cfg.d_sae <= target:
            return itda
        return prune_by_energy(itda, self.samples[hook], target)


@_holding_checkpoint_lock
def build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str | Sequence[str],
    cfg: BuildConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> ITDA | dict[str, ITDA]:
    """Build ITDA dictionaries at one or more hook points of a TransformerLens model.

    ``cfg`` holds every build setting (:class:`BuildConfig`); keyword arguments override its
    fields (``build_itda(model, tokens, hook, k=16, cos_threshold=0.9)``). ``tokens``: a LongTensor
    [n_seq, seq_len], an iterable of such batches, or a HF ``datasets`` dataset with a
    ``tokens``/``input_ids`` column (rows cut to ``context_size``) or a ``text`` column (packed into
    BOS-separated windows as sae_lens's ActivationsStore does). All hooks share one forward pass that
    stops after the deepest one. Returns one ITDA, or ``{hook: ITDA}`` for a list of hooks.
    """
    cfg = _config(cfg, overrides)
    hooks = [hook_name] if isinstance(hook_name, str) else list(hook_name)
    check_hook_names(model, hooks)
    excluded = torch.tensor(
        excluded_token_ids(model, "auto" if cfg.exclude_special_tokens else None), dtype=torch.long
    )
    tokenizer = getattr(model, "tokenizer", None)
    model_device = getattr(getattr(model, "cfg", None), "device", None) or "cpu"
    device = cfg.device if cfg.device is not None else default_device(model_device)

    def to_updates(toks: Tensor, offset: int) -> tuple[dict[str, ActivationBatch], int, float]:
        hb = read_batch(model, toks, hooks, offset=offset, skip_token_ids=excluded.tolist())
        updates = {
            h: ActivationBatch(a, hb.labels, hb.token_ids, hb.keep) for h, a in hb.acts.items()
        }
        return updates, hb.n_sequences, hb.forward_seconds

    total = None
    if isinstance(tokens, Tensor) and tokens.ndim == 2:
        total = math.ceil(tokens.shape[0] / cfg.batch_size)
    elif (
        hasattr(tokens, "column_names")
        and hasattr(tokens, "__len__")
        and "text" not in tokens.column_names
    ):
        total = math.ceil(len(tokens) / cfg.batch_size)
    raw: Iterator[Tensor] = token_batches(
        tokens, cfg.batch_size, context_size=cfg.context_size, tokenizer=tokenizer
    )
    sizing = _Sizing(raw, to_updates, cfg)
    fingerprint = {
        **cfg.to_dict(),
        "checkpoint_every": None,  # how often is not what
        "hooks": hooks,
        "excluded_token_ids": excluded.tolist(),
        "model": _model_fingerprint(model),
    }
    stream = Stream(
        sizing.raw,
        to_updates,
        key=lambda t: t,
        total=total,
        first_tokens=lambda t: t[:, 0].tolist(),
    )
    builders, state = run_stream(
        stream,
        cfg,
        fingerprint,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        thresholds=sizing.thresholds,
    )
    comm = Comm.current()
    world = 1 if comm is None else comm.world
    bos = getattr(tokenizer, "bos_token_id", None)
    first = state.first_column
    seq_len = state.context_size
    common = {
        "model_name": model_name or getattr(getattr(model, "cfg", None), "model_name", None),
        "context_size": seq_len,
        "prepend_bos": bool(first) and bos is not None and all(t == bos for t in first),
        "dataset_path": dataset_path,
    }
    stream_meta = {
        "sha256": state.stream_sha256,
        "n_sequences": state.sequences,
        "context_size": seq_len,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "prefix_sha256": state.prefix_sha256,
        "prefix_sequences": PREFIX_SEQUENCES,
    }
    out = {
        h: sizing.finish(
            h,
            b.to_itda(
                hook_name=h,
                **common,
                metadata={
                    "itda_builder": {
                        **b.summary(),
                        **sizing.metadata(h),
                        "forward_seconds": round(state.forward_seconds, 3),
                        "world_size": world,
                        "wire_bytes": state.wire_bytes,
                        "batch_size": cfg.batch_size,
                        "excluded_token_ids": excluded.tolist(),
                    },
                    "build_config": cfg.to_dict(),
                    "token_stream": stream_meta,
                },
            ),
        )
        for h, b in builders.items()
    }
    return out[hooks[0]] if isinstance(hook_name, str) else out


@_holding_checkpoint_lock
def build_itda_from_activations(
    batches: Iterable[Tensor | tuple[Tensor, ...]],
    cfg: BuildConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    **overrides: Any,
) -> ITDA:
    """The same build over any iterable of activations (HF / nnsight models, disk caches).

    Each item is ``acts [n, d]``, or ``(acts, labels [n, 2])``, or ``(acts, labels, token_ids [n])``.
    Without labels an activation is labelled ``(its row in the stream, -1)``. With
    ``target_atoms`` the threshold is searched on the first ``target_sample_tokens`` rows (all of
    them if fewer), which are buffered.
    """
    cfg = _config(cfg, overrides)

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
        eligible = torch.ones(n, dtype=torch.bool)
        return {"activations": ActivationBatch(acts, labels.long(), tids, eligible)}, n, 0.0

    total = len(batches) if hasattr(batches, "__len__") else None
    raw: Iterator[Any] = iter(batches)
    sizing = _Sizing(raw, parse, cfg)
    stream = Stream(
        sizing.raw,
        parse,
        key=lambda item: item if isinstance(item, Tensor) else item[0],
        total=total,
    )
    fingerprint = {**cfg.to_dict(), "checkpoint_every": None}
    builders, state = run_stream(
        stream,
        cfg,
        fingerprint,
        device=cfg.device or (default_device() if torch.cuda.is_available() else None),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        thresholds=sizing.thresholds,
    )
    b = builders["activations"]
    meta = {
        "itda_builder": {**b.summary(), **sizing.metadata("activations")},
        "build_config": cfg.to_dict(),
        "token_stream": {"sha256": state.stream_sha256, "n_rows": state.sequences},
    }
    return sizing.finish("activations", b.to_itda(metadata={**meta, **(metadata or {})}))
