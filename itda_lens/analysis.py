"""Reading dictionaries: reconstruction error, atom usage on data, and atoms shown as tokens in
their source context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from itda_lens.activations import iter_hook_activations, token_batches
from itda_lens.saes import ITDABase


def fvu(x: Float[Tensor, "n d"], recon: Float[Tensor, "n d"]) -> float:
    """Fraction of variance unexplained: ``Σ‖x̂ − x‖² / Σ‖x − x̄‖²`` (1 − explained variance)."""
    return float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@dataclass
class AtomUsage:
    """How often each atom is used (non-zero code) on some tokens, and its strongest example."""

    counts: Int[Tensor, " d_sae"]
    n_tokens: int
    top_value: Float[Tensor, " d_sae"]
    top_where: Int[Tensor, "d_sae 2"]  # (sequence, position) of the largest |code| per atom


def atom_usage(
    itda: ITDABase[Any], model: Any, tokens: Int[Tensor, "n seq"], *, batch_size: int = 32
) -> AtomUsage:
    """Encode ``tokens`` at the ITDA's hook (a transcoder's input hook) and count each atom's use
    (special positions skipped)."""
    hook = itda.cfg.metadata.hook_name
    d_sae = itda.cfg.d_sae
    counts = torch.zeros(d_sae, dtype=torch.long)
    top_value = torch.zeros(d_sae)
    top_where = torch.full((d_sae, 2), -1, dtype=torch.long)
    n_tokens = 0
    for batch in iter_hook_activations(model, tokens, [hook], batch_size=batch_size):
        code = itda.encode_sparse(batch.kept(hook))
        idx, val = code.indices.cpu(), code.values.abs().float().cpu()
        flat_idx, flat_val = idx.flatten(), val.flatten()
        flat_row = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])
        m = flat_val > 0  # an atom picked twice for one token counts once
        pairs = torch.unique(flat_row[m] * d_sae + flat_idx[m])
        counts += torch.bincount(pairs % d_sae, minlength=d_sae)
        best = torch.zeros(d_sae).scatter_reduce(0, flat_idx, flat_val, "amax")
        hit = (flat_val == best[flat_idx]) & (flat_val > 0)
        first = torch.full((d_sae,), idx.shape[0], dtype=torch.long)
        first = first.scatter_reduce(0, flat_idx[hit], flat_row[hit], "amin")
        better = best > top_value
        where = batch.labels[batch.keep]
        top_where[better] = where[first[better]]
        top_value = torch.maximum(top_value, best)
        n_tokens += int(batch.keep.sum())
    return AtomUsage(counts, n_tokens, top_value, top_where)


def in_context(tokenizer: Any, sequence: Int[Tensor, " seq"], pos: int, window: int = 8) -> str:
    """``...left [[token]] right...`` around ``pos``, decoded with the tokenizer."""

    def text(ids: Tensor) -> str:
        return tokenizer.decode(ids.tolist()).replace("\n", "\\n") if ids.numel() else ""

    left = text(sequence[max(0, pos - window) : pos])
    right = text(sequence[pos + 1 : pos + 1 + window // 2])
    return f"{left}[[{text(sequence[pos : pos + 1])}]]{right}"


def replay_sequences(
    tokens: Any, wanted: set[int], *, context_size: int | None, tokenizer: Any
) -> dict[int, Tensor]:
    """The sequences with the given stream indices, replaying the same batching the builder used."""
    found: dict[int, Tensor] = {}
    if not wanted:
        return found
    last, offset = max(wanted), 0
    for batch in token_batches(tokens, 64, context_size=context_size, tokenizer=tokenizer):
        for i in range(batch.shape[0]):
            if offset + i in wanted:
                found[offset + i] = batch[i]
        offset += batch.shape[0]
        if offset > last:
            break
    return found
