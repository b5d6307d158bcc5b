"""Activations: the one reader from a model and tokens to activations at hook points.

Token inputs users have (a LongTensor, an iterable of batches, a HF ``datasets`` dataset with a
tokens or text column) become ``[batch, seq]`` token batches (:func:`token_batches`); a forward
pass that stops after the deepest hook reads them (:func:`read_batch`), flattened to rows with
their provenance ``(sequence, position)`` and a mask of the positions that are not special tokens
(BOS/EOS/PAD). :func:`iter_hook_activations` chains the two; :func:`collect_activations` caches one
hook's activations (special positions dropped) as :class:`CachedActivations`, the data type the
comparison SAEs, PAM and the cluster SAEs train on. This is the only module that knows
TransformerLens hook naming (sae_lens only warns on unknown hooks; we raise).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE, SAEConfig
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from torch import Tensor
from transformer_lens import HookedRootModule

from itda_lens.sources import as_source

TOKEN_COLUMNS = ("tokens", "input_ids")
TokenInput = Tensor | Iterable[Tensor] | Any  # Any: datasets.Dataset / IterableDataset


def check_hook_names(model: HookedRootModule, hook_names: Sequence[str]) -> None:
    """Raise a ValueError naming any hook the model does not have, with the closest real ones."""
    if not hook_names:
        raise ValueError("no hook name given; e.g. hook_name='blocks.0.hook_resid_post'")
    available = list(model.hook_dict)
    for name in hook_names:
        if not isinstance(name, str):
            raise TypeError(f"hook names must be strings, got {name!r}")
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, available, n=4, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"the model has no hook point {name!r}.{hint} "
                f"See model.hook_dict for all {len(available)} hook names."
            )


def stop_at_layer(hook_names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every requested hook (None: run the whole model)."""
    stops = []
    for name in hook_names:
        if name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            stops.append(0)
            continue
        stop = extract_stop_at_layer_from_tlens_hook_name(name)
        if stop is None or not name.startswith("blocks."):
            return None
        stops.append(stop)
    return max(stops)


def special_token_ids(model: Any, kinds: Sequence[str] | None = None) -> list[int]:
    """The tokenizer's structural special token ids (sae_lens's ``get_special_token_ids``: BOS,
    EOS, PAD, ...), or only the given ``kinds`` (e.g. ``("bos", "pad")``)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    if kinds is None:
        return sorted(get_special_token_ids(tok))
    ids = {getattr(tok, f"{kind}_token_id", None) for kind in kinds}
    return sorted(i for i in ids if i is not None)


def excluded_token_ids(
    model: HookedRootModule, spec: Sequence[int] | Literal["auto"] | None
) -> list[int]:
    """Token ids whose positions never become atoms: 'auto' = the tokenizer's BOS and PAD."""
    if spec is None:
        return []
    if spec == "auto":
        return special_token_ids(model, ("bos", "pad"))
    return sorted({int(i) for i in spec})


def _check_tokens(batch: Any, what: str) -> Int[Tensor, "batch seq"]:
    if not isinstance(batch, Tensor):
        batch = torch.as_tensor(batch)
    if batch.is_floating_point() or batch.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {batch.dtype}")
    if batch.ndim != 2 or batch.shape[1] == 0:
        raise ValueError(f"{what} must have shape [n_seq, seq_len], got {tuple(batch.shape)}")
    return batch.long()


def token_batches(
    tokens: TokenInput,
    batch_size: int,
    *,
    context_size: int | None = None,
    tokenizer: Any = None,
) -> Iterator[Int[Tensor, "batch seq"]]:
    """Yield ``[batch, seq]`` token batches from any supported token input, in stream order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(tokens, Tensor):
        tokens = _check_tokens(tokens, "tokens")
        if context_size is not None:
            tokens = tokens[:, :context_size]
        for start in range(0, tokens.shape[0], batch_size):
            yield tokens[start : start + batch_size]
        return
    if hasattr(tokens, "column_names"):  # datasets.Dataset / IterableDataset
        columns = tokens.column_names
        if columns is None:  # a streamed dataset whose features are unknown until read
            columns = list(next(iter(tokens), {}).keys())
        yield from _dataset_batches(tokens, list(columns), batch_size, context_size, tokenizer)
        return
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Iterable):
        raise TypeError(
            "tokens must be a LongTensor [n_seq, seq_len], an iterable of such batches, "
            f"or a datasets.Dataset with a tokens/input_ids/text column; got {type(tokens).__name__}"
        )
    for i, batch in enumerate(tokens):
        batch = _check_tokens(batch, f"token batch {i}")
        yield batch[:, :context_size] if context_size is not None else batch


def _dataset_batches(
    ds: Any, columns: list[str], batch_size: int, context_size: int | None, tokenizer: Any
) -> Iterator[Tensor]:
    token_col = next((c for c in TOKEN_COLUMNS if c in columns), None)
    if token_col is not None:
        sequences: Iterator[Tensor] = _pretokenized(ds, token_col, context_size)
    elif "text" in columns:
        if tokenizer is None:
            raise ValueError("a text dataset needs a tokenizer: the model has none")
        sequences = _tokenized_text(ds, tokenizer, context_size or 128)
    else:
        raise ValueError(
            f"the dataset needs a 'tokens', 'input_ids' or 'text' column; it has {columns}"
        )
    batch: list[Tensor] = []
    for seq in sequences:
        batch.append(seq)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _pretokenized(ds: Any, column: str, context_size: int | None) -> Iterator[Tensor]:
    width = context_size
    for i, row in enumerate(ds):
        seq = torch.as_tensor(row[column], dtype=torch.long)
        width = width or seq.shape[0]
        if seq.shape[0] < width:
            raise ValueError(
                f"dataset row {i} has {seq.shape[0]} tokens, fewer than context_size={width}"
            )
        yield seq[:width]


def _tokenized_text(ds: Any, tokenizer: Any, context_size: int) -> Iterator[Tensor]:
    """Tokenise and pack text exactly as sae_lens's ActivationsStore does (BOS-separated windows)."""
    bos = tokenizer.bos_token_id
    docs = (
        torch.tensor(
            tokenizer(row["text"], add_special_tokens=False)["input_ids"], dtype=torch.long
        )
        for row in ds
    )
    return concat_and_batch_sequences(
        (d for d in docs if d.numel()),
        context_size=context_size,
        begin_batch_token_id=bos,
        sequence_separator_token_id=bos,
    )


def hook_activations(
    model: HookedRootModule,
    tokens: Int[Tensor, "batch seq"],
    hook_names: Sequence[str],
    stop: int | None,
) -> dict[str, Float[Tensor, "batch seq d"]]:
    """Activations at ``hook_names`` from one forward pass that stops after the deepest one."""
    device = getattr(getattr(model, "cfg", None), "device", None)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens.to(device) if device is not None else tokens,
            names_filter=list(hook_names),
            stop_at_layer=stop,
        )
    return {name: cache[name] for name in hook_names}


def check_labels(labels: Tensor, shape: Sequence[int], what: str) -> None:
    """Raises unless ``labels`` is [n, 2] (sequence, position) inside ``shape`` (n_seq, seq)."""
    if labels.ndim != 2 or labels.shape[1] != 2:
        raise ValueError(f"labels must be [n, 2] (sequence, position), got {tuple(labels.shape)}")
    if labels.numel() and (
        int(labels.min()) < 0
        or int(labels[:, 0].max()) >= shape[0]
        or int(labels[:, 1].max()) >= shape[1]
    ):
        raise ValueError(f"labels reach outside {what} {tuple(shape)} (or are -1: no provenance)")


def activations_at_labels(
    model: HookedRootModule,
    tokens: Int[Tensor, "n_seq seq"],
    hook_names: Sequence[str],
    labels: Int[Tensor, "n 2"],
    batch_size: int = 32,
) -> dict[str, Float[Tensor, "n d"]]:
    """Each hook's activation at ``labels`` ((sequence index into ``tokens``, position), e.g. an
    ITDA's ``atom_labels``), running the model only on the sequences they name."""
    model = as_source(model)
    check_hook_names(model, hook_names)
    check_labels(labels, tokens.shape[:2], "the tokens")
    seqs, where = torch.unique(labels[:, 0], return_inverse=True)
    out: dict[str, list[Tensor]] = {h: [] for h in hook_names}
    for start in range(0, len(seqs), batch_size):
        acts = hook_activations(
            model, tokens[seqs[start : start + batch_size]], hook_names, stop_at_layer(hook_names)
        )
        for h in hook_names:
            out[h].append(acts[h].cpu())
    rows = {h: torch.cat(v) for h, v in out.items()}
    return {h: r[where, labels[:, 1]] for h, r in rows.items()}


def probe_activations(
    model: HookedRootModule,
    tokens: Int[Tensor, "n_seq seq"],
    hook_names: Sequence[str],
    n_tokens: int = 2048,
    seed: int = 7,
    batch_size: int = 32,
) -> dict[str, Float[Tensor, "n d"]]:
    """Each hook's activations at ``n_tokens`` probe tokens: positions drawn at random (``seed``)
    among the non-special tokens of as many leading sequences of ``tokens`` as it takes (so two
    models with the same tokenizer get the same probe tokens)."""
    model = as_source(model)
    check_hook_names(model, hook_names)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    special = torch.tensor(special_token_ids(model), dtype=torch.long)
    keep = ~torch.isin(tokens, special)
    enough = torch.cumsum(keep.sum(1), 0) >= n_tokens
    if not bool(enough.any()):
        raise ValueError(
            f"the probe data has {int(keep.sum())} non-special tokens, fewer than n_tokens="
            f"{n_tokens}: give more data or a smaller n_tokens"
        )
    n_seq = int(enough.float().argmax()) + 1
    flat = keep[:n_seq].reshape(-1).nonzero().flatten()
    pick = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:n_tokens]]
    labels = torch.stack([pick // tokens.shape[1], pick % tokens.shape[1]], 1)
    return activations_at_labels(model, tokens, hook_names, labels, batch_size)


class HookBatch(NamedTuple):
    """One token batch read at some hooks, flattened to rows in stream order."""

    acts: dict[str, Float[Tensor, "n d"]]
    token_ids: Int[Tensor, " n"]
    labels: Int[Tensor, "n 2"]  # (sequence index in the stream, token position)
    keep: Bool[Tensor, " n"]  # not a skipped (special) token
    n_sequences: int
    forward_seconds: float

    def kept(self, hook: str) -> Float[Tensor, "m d"]:
        """The hook's activations at the kept positions."""
        return self.acts[hook][self.keep.to(self.acts[hook].device)]


def read_batch(
    model: HookedRootModule,
    tokens: Int[Tensor, "batch seq"],
    hook_names: Sequence[str],
    *,
    offset: int = 0,
    skip_token_ids: Sequence[int] = (),
) -> HookBatch:
    """Run ``tokens`` (sequences ``offset..``) through the model and read ``hook_names``."""
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if (
        d_vocab is not None
        and tokens.numel()
        and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0)
    ):
        raise ValueError(
            f"token ids must lie in [0, {d_vocab}); got range [{int(tokens.min())}, {int(tokens.max())}]"
        )
    t0 = time.perf_counter()
    acts = hook_activations(model, tokens, hook_names, stop_at_layer(hook_names))
    seconds = time.perf_counter() - t0
    b, s = tokens.shape
    labels = torch.stack(
        [torch.arange(offset, offset + b).repeat_interleave(s), torch.arange(s).repeat(b)], dim=1
    )
    flat = tokens.reshape(-1).cpu()
    keep = ~torch.isin(flat, torch.tensor(list(skip_token_ids), dtype=torch.long))
    return HookBatch(
        {h: a.reshape(b * s, -1) for h, a in acts.items()}, flat, labels, keep, b, seconds
    )


def iter_hook_activations(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_names: Sequence[str],
    *,
    batch_size: int = 32,
    context_size: int | None = None,
    skip_token_ids: Sequence[int] | None = None,
) -> Iterator[HookBatch]:
    """:func:`read_batch` over every token batch of ``tokens``, in stream order. By default the
    tokenizer's special tokens (BOS, EOS, PAD) are marked as not kept."""
    model = as_source(model)
    check_hook_names(model, hook_names)
    skip = special_token_ids(model) if skip_token_ids is None else list(skip_token_ids)
    tokenizer = getattr(model, "tokenizer", None)
    offset = 0
    for batch in token_batches(tokens, batch_size, context_size=context_size, tokenizer=tokenizer):
        out = read_batch(model, batch, hook_names, offset=offset, skip_token_ids=skip)
        offset += out.n_sequences
        yield out


USAGE_KEYS = ("hook_name", "model_name", "context_size", "prepend_bos")


@dataclass
class CachedActivations:
    """Activations at one hook for the non-special positions of some tokens, in stream order."""

    acts: Float[Tensor, "n d"]
    token_ids: Int[Tensor, " n"]
    hook_name: str
    context_size: int
    forward_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.acts.shape[0] / max(self.forward_seconds, 1e-9)

    def usage_metadata(self, model_name: str | None) -> dict[str, Any]:
        """The sae_lens metadata an SAE trained on these activations needs to be attached and
        evaluated where they came from."""
        return {
            "hook_name": self.hook_name,
            "model_name": model_name,
            "context_size": self.context_size,
            "prepend_bos": True,
        }


def usage_metadata(sae: SAE[Any]) -> dict[str, Any]:
    """The same keys, read from an existing SAE (for another SAE used in its place)."""
    return {k: v for k, v in sae.cfg.metadata.to_dict().items() if k in USAGE_KEYS}


def set_metadata(cfg: SAEConfig, values: Mapping[str, Any]) -> None:
    """Write ``values`` into ``cfg.metadata``."""
    for key, value in values.items():
        cfg.metadata[key] = value


def collect_activations(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_name: str,
    *,
    batch_size: int = 32,
    context_size: int | None = None,
    max_tokens: int | None = None,
) -> CachedActivations:
    """One forward pass (stopping after ``hook_name``) over ``tokens`` (a token tensor, batches, or a
    dataset, as for ``build_itda``); BOS/EOS/PAD positions dropped; at most ``max_tokens`` kept."""
    chunks, ids, seconds, kept, seq = [], [], 0.0, 0, 0
    for batch in iter_hook_activations(
        model, tokens, [hook_name], batch_size=batch_size, context_size=context_size
    ):
        seconds += batch.forward_seconds
        chunks.append(batch.kept(hook_name).float().cpu())
        ids.append(batch.token_ids[batch.keep])
        kept += int(batch.keep.sum())
        seq = int(batch.labels[:, 1].max()) + 1
        if max_tokens is not None and kept >= max_tokens:
            break
    if not chunks or kept == 0:
        raise ValueError("no activations collected: the token input is empty or all special tokens")
    acts_all, ids_all = torch.cat(chunks), torch.cat(ids)
    if max_tokens is not None:
        acts_all, ids_all = acts_all[:max_tokens], ids_all[:max_tokens]
    return CachedActivations(acts_all, ids_all, hook_name, seq, seconds)


@dataclass
class ActivationSummary:
    """Streamed first and second moments of an activation matrix (no full-size copies)."""

    count: int
    mean: Float[Tensor, " d"]
    mean_norm: float
    variance: Float[Tensor, " d"]


def summarise_activations(acts: Tensor, chunk_size: int = 8192) -> ActivationSummary:
    """Check ``acts`` is a finite float matrix ``[n, d]`` and summarise it chunk by chunk (works on
    memory-mapped tensors without reading them into memory at once)."""
    if not isinstance(acts, Tensor) or acts.ndim != 2 or not acts.is_floating_point():
        raise ValueError(
            f"activations must be a float tensor [n, d_in], got {getattr(acts, 'shape', type(acts))}"
        )
    n, d = acts.shape
    if n == 0:
        raise ValueError("no activations")
    total = torch.zeros(d, dtype=torch.float64)
    sq = torch.zeros(d, dtype=torch.float64)
    norms = 0.0
    for start in range(0, n, chunk_size):
        x = acts[start : start + chunk_size].double().cpu()
        if not bool(torch.isfinite(x).all()):
            bad = start + int((~torch.isfinite(x)).any(1).nonzero()[0])
            raise ValueError(f"activations contain NaN or Inf (first at row {bad})")
        total += x.sum(0)
        sq += (x * x).sum(0)
        norms += float(x.norm(dim=1).sum())
    mean = total / n
    return ActivationSummary(n, mean, norms / n, (sq / n - mean * mean).clamp_min(0))
