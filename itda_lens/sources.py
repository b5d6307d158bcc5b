"""Activation sources: token batches run through a TransformerLens model and read at hook points.

This is the only module that knows TransformerLens hook naming. It turns the token inputs users
have (a LongTensor, an iterable of batches, a HF ``datasets`` dataset with a tokens or text
column) into ``[batch, seq]`` token batches, validates hook names (sae_lens only warns on unknown
ones; we raise), and runs ``run_with_cache(names_filter=..., stop_at_layer=...)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from torch import Tensor
from transformer_lens import HookedRootModule

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
    layers = []
    for name in hook_names:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match:
            layers.append(int(match.group(1)) + 1)
        elif name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            layers.append(0)
        else:
            return None
    return max(layers)


def special_token_ids(
    model: HookedRootModule, kinds: Sequence[str] = ("bos", "eos", "pad")
) -> list[int]:
    """The tokenizer's ids for the given special tokens (evals and activation caches skip BOS/EOS/PAD)."""
    tok = getattr(model, "tokenizer", None)
    ids = {getattr(tok, f"{kind}_token_id", None) for kind in kinds} if tok is not None else set()
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
