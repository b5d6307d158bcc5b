"""The streaming build: read batches in stream order, feed every hook's :class:`ITDABuilder`,
checkpoint, resume, and stop on a token budget or when every dictionary is full or converged.

``build_itda`` reads token batches through a TransformerLens model and returns ``{hook: ITDA}``;
``build_itda_from_activations`` reads activations the caller already has and returns one ITDA. Both
run the same loop (:func:`run_stream`), whose state between batches is the typed
:class:`BuildProgress`, and both write the same typed :class:`~itda_lens.saes.BuildRecord` into each
ITDA's metadata. A resumed build restores the checkpointed builders through their state API and
checks that the batches it skips are the ones the checkpoint read. The build functions hold their
checkpoint folder's lock from their first line to their last: a second build into the same folder
fails at once with :class:`~itda_lens.builder.checkpoint.CheckpointLockedError`. A data-parallel
build passes its process group (:class:`~itda_lens.builder.distributed.Comm`) down explicitly.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

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
from itda_lens.budget import default_device, memory_budget
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
from itda_lens.builder.transcoder import build_itda_transcoder
from itda_lens.saes import BUILD_RECORD_KEY, ITDA, ITDATranscoder, SearchRecord, StreamRecord
from itda_lens.saes.record import PREFIX_SEQUENCES, chain_digest, prefix_digest
from itda_lens.sources import as_source

#: Sequences whose hash identifies a token stream (``token_stream.prefix_sha256``), for similarity.

#: (raw batch, sequences before it) -> ({hook: ActivationBatch}, sequences in it, forward seconds)
ToUpdates = Callable[[Any, int], tuple[dict[str, ActivationBatch], int, float]]


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
    comm: Comm | None = None,
) -> tuple[dict[str, ITDABuilder], BuildProgress]:
    """Feed the stream to one builder per hook until it ends, the token budget is spent, or every
    builder is full or converged. ``thresholds`` overrides ``cos_threshold`` per hook; ``comm``
    makes it a data-parallel build. The caller holds the checkpoint folder's lock."""
    thresholds = thresholds or {}
    if comm is not None and cfg.batch_size % comm.world:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not divide among {comm.world} ranks: every rank "
            "reads an equal shard of each batch; use a multiple of the world size"
        )
    ckpt = Checkpointer(checkpoint_dir if comm is None or comm.rank == 0 else None)

    def hook_cfg(hook: str) -> BuildConfig:
        return cfg.replace(cos_threshold=thresholds[hook]) if hook in thresholds else cfg

    state, builders = _start(ckpt, resume, cfg, fingerprint, device, comm)
    state.thresholds = state.thresholds or dict(thresholds)
    for hook, b in builders.items():
        b.cfg = hook_cfg(hook)
    read = _reader(comm)
    skip, target_sha, running_sha = state.batches, state.stream_sha256, ""
    show = progress and (comm is None or comm.rank == 0)
    bar = tqdm(total=stream.total, desc="ITDA build", unit="batch", disable=not show, initial=skip)
    t0, seen_now, i = time.perf_counter(), 0, -1
    prefix: list[Tensor] = []  # the first sequences, fingerprinted for label compatibility
    try:
        for i, raw in enumerate(stream.raw):
            if stream.first_tokens is not None and sum(map(len, prefix)) < PREFIX_SEQUENCES:
                prefix.append(raw[: PREFIX_SEQUENCES - sum(map(len, prefix))])
            running_sha = chain_digest(running_sha, stream.key(raw))
            if i < skip:  # read by the checkpointed build: only check it is the same input
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
            updates, n_seq, n_tok, offset = _batch_updates(stream, raw, state, cfg, builders, comm)
            for hook, batch in updates.items():
                if hook not in builders:  # the hooks share the memory budget
                    dev = device or batch.acts.device
                    builders[hook] = ITDABuilder(
                        batch.acts.shape[1],
                        hook_cfg(hook),
                        device=dev,
                        budget=memory_budget(dev) // len(updates),
                    )
                state.wire_bytes += read(builders[hook], batch, offset, n_tok)
            state.sequences += n_seq
            state.tokens += n_tok
            state.batches = i + 1
            state.stream_sha256 = running_sha
            seen_now += n_tok
            state.finished = all(b.stopped for b in builders.values()) or (
                cfg.max_tokens is not None and state.tokens >= cfg.max_tokens
            )
            bar.update(1)
            bar.set_postfix(
                atoms=",".join(str(len(b.store)) for b in builders.values()),
                tok_s=f"{seen_now / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
            if state.finished or state.batches % cfg.checkpoint_every == 0:
                ckpt.save(asdict(state), builders)
            if state.finished:
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


Reader = Callable[[ITDABuilder, ActivationBatch, int, int], int]


def _reader(comm: Comm | None) -> Reader:
    """How a builder reads its rows of a batch: alone, or as one rank of ``comm`` (``offset``:
    where this rank's rows start in the global batch of ``total`` rows). Returns bytes sent."""

    def alone(b: ITDABuilder, batch: ActivationBatch, offset: int, total: int) -> int:
        b.update(batch)
        return 0

    def one_rank(b: ITDABuilder, batch: ActivationBatch, offset: int, total: int) -> int:
        assert comm is not None
        return distributed_read(b, batch, comm, offset, total)[1]

    return alone if comm is None else one_rank


def _start(
    ckpt: Checkpointer,
    resume: bool,
    cfg: BuildConfig,
    fingerprint: dict[str, Any],
    device: Any,
    comm: Comm | None,
) -> tuple[BuildProgress, dict[str, ITDABuilder]]:
    """A fresh progress record, or the checkpointed one with its builders (a data-parallel build:
    rank 0 reads the checkpoint and every rank resumes from it, or fails with its error)."""
    if comm is None:
        saved = ckpt.load(resume, cfg, device or "cpu")
    else:  # the builders' states travel, not the builders (their Gram rows are rebuilt)
        payload, error = None, None
        if comm.rank == 0:
            try:
                loaded = ckpt.load(resume, cfg, device or "cpu")
                if loaded is not None:
                    payload = (loaded[0], {h: b.state_dict() for h, b in loaded[1].items()})
            except (ValueError, OSError) as err:
                error = err
        comm.agree("the build settings and model", fingerprint)
        payload, error = comm.broadcast((payload, error))
        if error is not None:
            raise error
        saved = None
        if payload is not None:
            builders = {}
            for hook, state in payload[1].items():
                builders[hook] = ITDABuilder(state["fields"]["d_in"], cfg, device=device or "cpu")
                builders[hook].load_state_dict(state)
            saved = (payload[0], builders)
    if saved is None:
        return BuildProgress(fingerprint), {}
    fields_, builders = saved
    if fields_["fingerprint"] != fingerprint:
        diff = {
            k: (fields_["fingerprint"].get(k), v)
            for k, v in fingerprint.items()
            if fields_["fingerprint"].get(k) != v
        }
        raise ValueError(
            f"the checkpoint in {ckpt.path.parent if ckpt.path else None} was written with other "
            f"settings (saved, now): {diff}"
        )
    return BuildProgress(**fields_), builders


def _batch_updates(
    stream: Stream,
    raw: Any,
    state: BuildProgress,
    cfg: BuildConfig,
    builders: dict[str, ITDABuilder],
    comm: Comm | None,
) -> tuple[dict[str, ActivationBatch], int, int, int]:
    """This process's rows of one raw batch as builder updates, cut at ``max_tokens``: (updates,
    sequences, tokens of the global batch, offset of this rank's rows in it)."""
    n_seq = stream.size(raw)
    lo, hi = (0, n_seq) if comm is None else shard(n_seq, comm.world, comm.rank)
    if hi > lo:
        updates, _, fwd = stream.to_updates(stream.rows(raw, lo, hi), state.sequences + lo)
    elif builders:  # a short last batch leaves this rank's shard empty
        device = next(iter(builders.values())).store.device
        updates, fwd = {h: empty_like(b, device) for h, b in builders.items()}, 0.0
    else:
        assert comm is not None
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
    return updates, n_seq, n_tok, offset


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
) -> tuple[list[Any], dict[str, Tensor], bool]:
    """The stream's first ``target_sample_tokens`` tokens (at most ``max_tokens``): the raw batches
    read (to be streamed again), per hook the activations allowed to become atoms, and whether
    the stream goes on past the sample (rows left in the last batch read, or another batch)."""
    budget = min(cfg.max_tokens or cfg.target_sample_tokens, cfg.target_sample_tokens)
    head: list[Any] = []
    parts: dict[str, list[Tensor]] = {}
    read = sequences = 0
    more = False
    while read < budget and (item := next(raw, None)) is not None:
        head.append(item)
        updates, n_seq, _ = to_updates(item, sequences)
        sequences += n_seq
        rows = next(iter(updates.values())).acts.shape[0]
        n = min(rows, budget - read)
        more = n < rows
        read += n
        for hook, b in _cut(updates, n).items():
            parts.setdefault(hook, []).append(b.acts[b.eligible])
    if not head:
        raise ValueError("no activations: the input yielded no batches")
    if not more and read >= budget:
        peek = next(raw, None)
        if peek is not None:
            head.append(peek)
            more = True
    more &= cfg.max_tokens is None or cfg.max_tokens > read
    return head, {h: torch.cat(p) for h, p in parts.items()}, more


class _Sizing:
    """``target_atoms``: the threshold per hook found on a sample of the stream, and the optional
    energy refinement that prunes the (wider) built dictionary back to the target on that sample."""

    def __init__(self, raw: Iterator[Any], to_updates: ToUpdates, cfg: BuildConfig):
        self.cfg = cfg
        self.searches: dict[str, ThresholdSearch] = {}
        self.samples: dict[str, Tensor] = {}
        self.raw = raw
        self.longer = False  # the stream goes on past the sample
        if cfg.atoms_to_build is not None:
            head, self.samples, self.longer = _read_sample(raw, to_updates, cfg)
            self.searches = {
                h: find_threshold(x, cfg, cfg.atoms_to_build) for h, x in self.samples.items()
            }
            self.raw = itertools.chain(head, raw)

    def builder_config(self) -> BuildConfig:
        """The config the builders run with: on a stream longer than the sample, the dictionary
        would keep growing past the target at the sample's threshold, so they stop at the number
        of atoms the sized build aims at (``max_atoms``)."""
        n = self.cfg.atoms_to_build
        if n is None or not self.longer or (self.cfg.max_atoms or n + 1) <= n:
            return self.cfg
        return self.cfg.replace(max_atoms=n)

    @property
    def thresholds(self) -> dict[str, float]:
        return {h: s.threshold for h, s in self.searches.items()}

    def record(self, hook: str) -> SearchRecord | None:
        search = self.searches.get(hook)
        if search is None:
            return None
        return SearchRecord(
            threshold=search.threshold,
            target=search.target,
            sample_tokens=search.sample_rows,
            atoms_on_sample=search.atoms,
            steps=[list(p) for p in search.history],
            seconds=round(search.seconds, 3),
        )

    def finish(self, hook: str, itda: ITDA) -> ITDA:
        """The built ITDA, pruned to ``target_atoms`` when refining (and wider than that)."""
        target = self.cfg.target_atoms
        if self.cfg.refine == "none" or target is None or itda.cfg.d_sae <= target:
            return itda
        return prune_by_energy(itda, self.samples[hook], target)


@overload
def build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str | Sequence[str],
    cfg: BuildConfig | None = None,
    *,
    hook_out: None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> dict[str, ITDA]: ...


@overload
def build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str,
    cfg: BuildConfig | None = None,
    *,
    hook_out: str,
    checkpoint_dir: None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> ITDATranscoder: ...


def build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str | Sequence[str],
    cfg: BuildConfig | None = None,
    *,
    hook_out: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> dict[str, ITDA] | ITDATranscoder:
    """Build ITDA dictionaries at one or more hook points of a TransformerLens model (or a model
    read at module paths: :class:`~itda_lens.sources.ModuleSource`, an nnsight model, which is
    wrapped in :class:`~itda_lens.sources.NNsightSource`); returns ``{hook: ITDA}`` (one entry per
    hook, also for a single hook name).

    ``cfg`` holds every build setting (:class:`BuildConfig`); keyword arguments override its
    fields (``build_itda(model, tokens, hook, k=16, cos_threshold=0.9)``). ``tokens``: a LongTensor
    [n_seq, seq_len], an iterable of such batches, or a HF ``datasets`` dataset with a
    ``tokens``/``input_ids`` column (rows cut to ``context_size``) or a ``text`` column (packed into
    BOS-separated windows as sae_lens's ActivationsStore does). All hooks share one forward pass that
    stops after the deepest one. Each ITDA carries its :class:`~itda_lens.saes.BuildRecord`.

    With ``hook_out``: an ITDA transcoder from the one hook ``hook_name`` to ``hook_out``
    (:func:`~itda_lens.builder.transcoder.build_itda_transcoder`, which also takes ``judge``,
    ``skip_connection`` and ``refit_decoder`` here), returned as itself.
    """
    if hook_out is not None:
        if not isinstance(hook_name, str):
            raise ValueError(
                f"hook_out builds a transcoder from one hook: hook_name must be a string, got "
                f"{hook_name!r}"
            )
        if checkpoint_dir is not None or resume:
            raise ValueError(
                "the transcoder build keeps no checkpoint: drop checkpoint_dir / resume"
            )
        return build_itda_transcoder(
            model, tokens, hook_name, hook_out, cfg, progress=progress, model_name=model_name,
            dataset_path=dataset_path, **overrides,
        )  # fmt: skip
    comm = Comm.current()
    with locked(checkpoint_dir, comm):
        return _build_itda(
            as_source(model), tokens, hook_name, _config(cfg, overrides), comm, checkpoint_dir,
            resume, progress, model_name, dataset_path,
        )  # fmt: skip


def _build_itda(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str | Sequence[str],
    cfg: BuildConfig,
    comm: Comm | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    model_name: str | None,
    dataset_path: str | None,
) -> dict[str, ITDA]:
    hooks = [hook_name] if isinstance(hook_name, str) else list(hook_name)
    check_hook_names(model, hooks)
    excluded = excluded_token_ids(model, "auto" if cfg.exclude_special_tokens else None)
    tokenizer = getattr(model, "tokenizer", None)
    model_device = getattr(getattr(model, "cfg", None), "device", None) or "cpu"
    device = cfg.device if cfg.device is not None else default_device(model_device)

    def to_updates(toks: Tensor, offset: int) -> tuple[dict[str, ActivationBatch], int, float]:
        hb = read_batch(model, toks, hooks, offset=offset, skip_token_ids=excluded)
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
        "excluded_token_ids": excluded,
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
        sizing.builder_config(),
        fingerprint,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        thresholds=sizing.thresholds,
        comm=comm,
    )
    bos = getattr(tokenizer, "bos_token_id", None)
    first = state.first_column
    record = StreamRecord(
        sha256=state.stream_sha256,
        n_rows=state.tokens,
        n_sequences=state.sequences,
        context_size=state.context_size,
        tokenizer=getattr(tokenizer, "name_or_path", None),
        prefix_sha256=state.prefix_sha256,
        prefix_sequences=PREFIX_SEQUENCES,
    )
    common = {
        "model_name": model_name or getattr(getattr(model, "cfg", None), "model_name", None),
        "context_size": state.context_size,
        "prepend_bos": bool(first) and bos is not None and all(t == bos for t in first),
        "dataset_path": dataset_path,
    }
    return {
        h: _finish(h, b, cfg, sizing, record, state, comm, excluded, common)
        for h, b in builders.items()
    }


def _finish(
    hook: str,
    b: ITDABuilder,
    cfg: BuildConfig,
    sizing: _Sizing,
    stream: StreamRecord,
    state: BuildProgress,
    comm: Comm | None,
    excluded: Sequence[int],
    from_atoms: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> ITDA:
    """A builder's ITDA with its build record (refined to ``target_atoms`` if asked)."""
    record = b.record(
        hook_name=None if hook == ACTIVATIONS else hook,
        config=cfg,
        stream=stream,
        forward_seconds=state.forward_seconds,
        world_size=1 if comm is None else comm.world,
        wire_bytes=state.wire_bytes,
        excluded_token_ids=excluded,
        search=sizing.record(hook),
    )
    itda = b.to_itda(
        hook_name=record.hook_name,
        **from_atoms,
        metadata={BUILD_RECORD_KEY: record.to_dict(), **(metadata or {})},
    )
    return sizing.finish(hook, itda)


#: the one "hook" of a build from activations
ACTIVATIONS = "activations"


def build_itda_from_activations(
    batches: Iterable[Tensor | tuple[Tensor, ...]],
    cfg: BuildConfig | None = None,
    *,
    tokens: Tensor | None = None,
    tokenizer: str | None = None,
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
    them if fewer), which are buffered. ``tokens`` (the token ids [n_seq, seq] the activations
    were read from, labels then being (sequence, position) in them) lets the build record
    fingerprint the token stream as ``build_itda`` does, so its labels can be compared with other
    dictionaries' (similarity, diffing); ``tokenizer`` names it in the record.
    """
    comm = Comm.current()
    with locked(checkpoint_dir, comm):
        return _build_from_activations(
            batches, _config(cfg, overrides), tokens, tokenizer, comm, checkpoint_dir, resume,
            progress, metadata,
        )  # fmt: skip


def _build_from_activations(
    batches: Iterable[Tensor | tuple[Tensor, ...]],
    cfg: BuildConfig,
    tokens: Tensor | None,
    tokenizer: str | None,
    comm: Comm | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    metadata: dict[str, Any] | None,
) -> ITDA:
    if tokens is not None and (
        not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point()
    ):
        raise ValueError(
            "tokens must be the integer token ids [n_seq, seq] the activations came from"
        )

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
        return {ACTIVATIONS: ActivationBatch(acts, labels.long(), tids, eligible)}, n, 0.0

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
        sizing.builder_config(),
        fingerprint,
        device=cfg.device or (default_device() if torch.cuda.is_available() else None),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        thresholds=sizing.thresholds,
        comm=comm,
    )
    record = StreamRecord(
        sha256=state.stream_sha256,
        n_rows=state.tokens,
        n_sequences=None if tokens is None else int(tokens.shape[0]),
        context_size=None if tokens is None else int(tokens.shape[1]),
        tokenizer=tokenizer,
        prefix_sha256=None if tokens is None else prefix_digest(tokens),
        prefix_sequences=None if tokens is None else PREFIX_SEQUENCES,
    )
    b = builders[ACTIVATIONS]
    return _finish(ACTIVATIONS, b, cfg, sizing, record, state, comm, [], {}, metadata)
