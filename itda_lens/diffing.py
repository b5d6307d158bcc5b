"""Model diffing with ITDA: where a fine-tune differs from its base, read from two dictionaries.

Dictionaries of a base model and of its fine-tune built over the same token stream with the same
settings share a label space (``(sequence, position)`` of the stream), so the label Jaccard says
how much of what each model needed to represent is the same, and every atom of one side can be
tested against the other side's dictionary. Per token of any token set, two directions:

- ``base_on_ft``: relative error ``|x - x_hat|^2 / |x|^2`` of the fine-tune's activation encoded
  with the base dictionary (how far the base's vocabulary is from what the fine-tune computes);
  ``ft_on_base`` is the reverse;
- ``base_gap`` / ``ft_gap``: the same minus the dictionary's error on its own model's activation
  at that token, so tokens every dictionary finds hard (rare words) do not rank first;
- ``ft_dict_gap`` / ``base_dict_gap``: the base dictionary's error on the fine-tune's activation
  minus the fine-tune dictionary's error on it (and the reverse): the same activation, two
  dictionaries, so scoring needs only one model's forward pass.

Only the two models' activations at the hooks are read, so any pair with the same tokenizer and
activation width works: TransformerLens models and the module-path sources alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from itda_lens.activations import (
    TokenInput,
    check_hook_names,
    excluded_token_ids,
    read_batch,
    token_batches,
)
from itda_lens.builder import BuildConfig, build_itda
from itda_lens.builder.stream import prefix_digest
from itda_lens.saes import ITDA
from itda_lens.similarity import label_set

Score = Literal["base_on_ft", "ft_on_base", "base_gap", "ft_gap", "ft_dict_gap", "base_dict_gap"]
SCORES: tuple[Score, ...] = (
    "base_on_ft",
    "ft_on_base",
    "base_gap",
    "ft_gap",
    "ft_dict_gap",
    "base_dict_gap",
)
#: the score each direction ranks by (the ones benchmarks/diffing.py measured best, gaps)
DIRECTIONS: dict[str, Score] = {"fine-tune": "base_gap", "base": "ft_gap"}


#: Build settings for diffing: one fixed threshold for both models (so atoms mean "this model
#: needed a new direction here"), high enough for ~2k atoms per layer on 45k zoo tokens.
DIFF_CONFIG = BuildConfig(k=20, cos_threshold=0.95)


class ModelMismatch(ValueError):
    """The two models cannot be diffed: different tokenizers, or activations of different width."""


def _vocab(model: Any) -> dict[str, int] | int | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        return tokenizer.get_vocab()
    return getattr(getattr(model, "cfg", None), "d_vocab", None)


def check_pair(base: Any, ft: Any, hooks: Sequence[str]) -> dict[str, int]:
    """Refuse a pair whose tokens or activations do not line up; returns the width at each hook."""
    va, vb = _vocab(base), _vocab(ft)
    if va is None or vb is None:
        raise ModelMismatch("both models need a tokenizer (or cfg.d_vocab) to check they agree")
    if va != vb:
        size = lambda v: v if isinstance(v, int) else len(v)  # noqa: E731
        raise ModelMismatch(
            f"the two models use different tokenizers (vocabularies of {size(va)} and "
            f"{size(vb)} tokens, or the same size with different tokens): diffing compares the "
            "two models on the same tokens, so both must share one tokenizer"
        )
    check_hook_names(base, hooks)
    check_hook_names(ft, hooks)
    probe = torch.zeros(1, 2, dtype=torch.long)
    wa = {h: a.shape[-1] for h, a in read_batch(base, probe, hooks).acts.items()}
    wb = {h: a.shape[-1] for h, a in read_batch(ft, probe, hooks).acts.items()}
    bad = {h: (wa[h], wb[h]) for h in hooks if wa[h] != wb[h]}
    if bad:
        raise ModelMismatch(
            "activation widths differ between the models at "
            + ", ".join(f"{h} ({a} vs {b})" for h, (a, b) in bad.items())
            + ": diffing needs the same d_model (a fine-tune of the base, or an equal-size model)"
        )
    return wa


def build_pair(
    base: Any,
    ft: Any,
    tokens: TokenInput,
    hooks: Sequence[str],
    cfg: BuildConfig,
    *,
    names: tuple[str | None, str | None] = (None, None),
    dataset_path: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, ITDA], dict[str, ITDA]]:
    """ITDAs of both models at ``hooks``, built over the same ``tokens`` with the same ``cfg``."""
    if cfg.target_atoms is not None:
        raise ValueError(
            "diffing needs one cos_threshold for both models (target_atoms would size each "
            "dictionary with its own threshold): unset target_atoms"
        )
    check_pair(base, ft, hooks)
    out = []
    for model, name in ((base, names[0]), (ft, names[1])):
        built = build_itda(
            model,
            tokens,
            list(hooks),
            cfg,
            progress=progress,
            model_name=name,
            dataset_path=dataset_path,
        )
        out.append(built)
    return out[0], out[1]


def relative_error(x: Float[Tensor, "n d"], recon: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """``|x - recon|^2 / |x|^2`` per row (0 for a zero row reconstructed exactly)."""
    x, recon = x.double(), recon.double()
    return ((x - recon) ** 2).sum(-1) / (x**2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)


def reconstruction_error(itda: ITDA, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """Relative error of ``x`` encoded with the ITDA's pursuit (its ``k``)."""
    with torch.no_grad():
        x = x.to(itda.W_dec.device)
        return relative_error(x, itda.decode_sparse(itda.encode_sparse(x))).cpu()


def itda_scores(
    d_base: ITDA, d_ft: ITDA, x_base: Float[Tensor, "n d"], x_ft: Float[Tensor, "n d"]
) -> dict[Score, Float[Tensor, " n"]]:
    """Every :data:`SCORES` entry for paired activations of the same tokens."""
    b_on_f = reconstruction_error(d_base, x_ft)
    f_on_b = reconstruction_error(d_ft, x_base)
    b_on_b = reconstruction_error(d_base, x_base)
    f_on_f = reconstruction_error(d_ft, x_ft)
    return {
        "base_on_ft": b_on_f,
        "ft_on_base": f_on_b,
        "base_gap": b_on_f - b_on_b,
        "ft_gap": f_on_b - f_on_f,
        "ft_dict_gap": b_on_f - f_on_f,
        "base_dict_gap": f_on_b - b_on_b,
    }


@dataclass
class PairedBatch:
    """One token batch read at the hooks of both models, rows in stream order."""

    tokens: Int[Tensor, "b seq"]
    offset: int  # stream index of the batch's first sequence
    keep: Bool[Tensor, " n"]  # rows that are not special tokens
    base: dict[str, Float[Tensor, "n d"]]
    ft: dict[str, Float[Tensor, "n d"]]


def paired_batches(
    base: Any,
    ft: Any,
    tokens: TokenInput,
    hooks: Sequence[str],
    *,
    batch_size: int = 32,
    context_size: int | None = None,
) -> Iterator[PairedBatch]:
    """Both models' activations at ``hooks`` on the same batches (special positions marked)."""
    skip = excluded_token_ids(base, "auto")
    tokenizer = getattr(base, "tokenizer", None)
    offset = 0
    for toks in token_batches(tokens, batch_size, context_size=context_size, tokenizer=tokenizer):
        a = read_batch(base, toks, hooks, offset=offset, skip_token_ids=skip)
        b = read_batch(ft, toks, hooks, offset=offset, skip_token_ids=skip)
        yield PairedBatch(toks.cpu(), offset, a.keep, a.acts, b.acts)
        offset += toks.shape[0]


@dataclass
class TokenScores:
    """Per-token diff scores at one hook, on a grid ``[n_seq, seq]`` (NaN at special tokens)."""

    tokens: Int[Tensor, "n_seq seq"]
    scores: dict[Score, Float[Tensor, "n_seq seq"]]

    def top(self, score: Score, n: int, spread: int = 8) -> list[tuple[int, int, float]]:
        """The ``n`` highest-scoring tokens as (sequence, position, score), at most one per
        ``spread`` positions of a sequence so one passage does not fill the list."""
        grid = self.scores[score]
        flat = torch.nan_to_num(grid, nan=-torch.inf).flatten()
        order = torch.argsort(flat, descending=True, stable=True)
        seq_len = grid.shape[1]
        picked: list[tuple[int, int, float]] = []
        for i in order.tolist():
            if len(picked) == n or flat[i] == -torch.inf:
                break
            s, p = divmod(i, seq_len)
            if all(s != t or abs(p - q) >= spread for t, q, _ in picked):
                picked.append((s, p, float(flat[i])))
        return picked


#: ``scorer(hook, x_base, x_ft) -> {name: [n]}``: per-token values from paired activations
PairScorer = Callable[[str, Tensor, Tensor], Mapping[str, Tensor]]


def paired_grids(
    base: Any,
    ft: Any,
    tokens: TokenInput,
    hooks: Sequence[str],
    scorer: PairScorer,
    *,
    batch_size: int = 32,
    context_size: int | None = None,
    progress: bool = True,
) -> tuple[Int[Tensor, "n_seq seq"], dict[str, dict[str, Float[Tensor, "n_seq seq"]]]]:
    """``scorer`` on both models' activations of every non-special token, as ``[n_seq, seq]``
    grids per hook and name (NaN at special tokens), with the token grid they index."""
    rows: dict[str, dict[str, list[Tensor]]] = {h: {} for h in hooks}
    seqs: list[Tensor] = []
    batches = paired_batches(
        base, ft, tokens, hooks, batch_size=batch_size, context_size=context_size
    )
    for batch in tqdm(batches, desc="diff scores", unit="batch", disable=not progress):
        seqs.append(batch.tokens)
        keep = batch.keep
        for h in hooks:
            for name, v in scorer(h, batch.base[h][keep], batch.ft[h][keep]).items():
                full = torch.full((keep.numel(),), torch.nan, dtype=torch.float64)
                full[keep] = v.double().cpu()
                rows[h].setdefault(name, []).append(full.view(batch.tokens.shape))
    if not seqs:
        raise ValueError("no tokens to score")
    grids = {h: {name: torch.cat(v) for name, v in per.items()} for h, per in rows.items()}
    return torch.cat(seqs), grids


def token_scores(
    base: Any,
    ft: Any,
    d_base: Mapping[str, ITDA],
    d_ft: Mapping[str, ITDA],
    tokens: TokenInput,
    *,
    batch_size: int = 32,
    context_size: int | None = None,
    progress: bool = True,
) -> dict[str, TokenScores]:
    """:data:`SCORES` for every token of ``tokens`` at each hook the two dictionary sets share."""
    hooks = [h for h in d_base if h in d_ft]
    if not hooks:
        raise ValueError(
            f"the dictionaries share no hook (base {list(d_base)}, fine-tune {list(d_ft)})"
        )
    grid, grids = paired_grids(
        base,
        ft,
        tokens,
        hooks,
        lambda h, xb, xf: itda_scores(d_base[h], d_ft[h], xb, xf),
        batch_size=batch_size,
        context_size=context_size,
        progress=progress,
    )
    return {h: TokenScores(grid, grids[h]) for h in hooks}  # type: ignore[arg-type]


@dataclass
class LayerDiff:
    """What differs at one hook: the dictionaries, their overlap, the scores over the stream."""

    hook: str
    base: ITDA
    ft: ITDA
    scores: TokenScores

    @property
    def jaccard(self) -> float:
        a, b = label_set(self.base), label_set(self.ft)
        return len(a & b) / max(1, len(a | b))

    @property
    def shared_atoms(self) -> int:
        return len(label_set(self.base) & label_set(self.ft))

    def worst_atoms(self, side: str, n: int) -> list[tuple[int, int, int, float, bool]]:
        """The ``side`` dictionary's atoms (``"fine-tune"`` or ``"base"``) that the other side's
        dictionary reconstructs worst, by the side's :data:`DIRECTIONS` score at the atom's label:
        (atom, sequence, position, score, whether the other side has an atom at that label too)."""
        if side not in DIRECTIONS:
            raise ValueError(f"side must be one of {list(DIRECTIONS)}, got {side!r}")
        own, other = (self.ft, self.base) if side == "fine-tune" else (self.base, self.ft)
        shared = label_set(other)
        grid = self.scores.scores[DIRECTIONS[side]]
        out = []
        for atom, (s, p) in enumerate(own.atom_labels.tolist()):
            if s >= grid.shape[0] or p >= grid.shape[1]:
                continue
            v = float(grid[s, p])
            if v == v:  # not NaN
                out.append((atom, s, p, v, (s, p) in shared))
        return sorted(out, key=lambda t: -t[3])[:n]


def diff_models(
    base: Any,
    ft: Any,
    tokens: Int[Tensor, "n_seq seq"],
    hooks: Sequence[str],
    cfg: BuildConfig,
    *,
    names: tuple[str | None, str | None] = (None, None),
    dataset_path: str | None = None,
    progress: bool = True,
) -> list[LayerDiff]:
    """Build both dictionaries over ``tokens`` and score every token of the same stream, so atom
    labels and token scores index the same ``(sequence, position)`` grid."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError("diff_models takes a token tensor [n_seq, seq] (one stream for both)")
    if cfg.max_tokens is not None or cfg.patience_tokens is not None:
        raise ValueError(
            "diff_models scores the whole stream the dictionaries are built on: cut the tokens "
            "instead of setting max_tokens / patience_tokens"
        )
    d_base, d_ft = build_pair(
        base, ft, tokens, hooks, cfg, names=names, dataset_path=dataset_path, progress=progress
    )
    return _layer_diffs(base, ft, d_base, d_ft, tokens, cfg.batch_size, progress)


def diff_dictionaries(
    base: Any,
    ft: Any,
    d_base: Mapping[str, ITDA],
    d_ft: Mapping[str, ITDA],
    tokens: Int[Tensor, "n_seq seq"],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[LayerDiff]:
    """:func:`diff_models` with dictionaries built before (e.g. loaded from a previous diff):
    ``tokens`` must be the stream they were built on, which their metadata fingerprints."""
    hooks = [h for h in d_base if h in d_ft]
    for side, dicts in (("base", d_base), ("fine-tune", d_ft)):
        for h in hooks:
            record = dicts[h].build_record
            stream = None if record is None else record.stream
            n_seq = None if stream is None else stream.n_sequences
            if (
                n_seq != tokens.shape[0]
                or stream is None
                or stream.prefix_sha256 != prefix_digest(tokens)
            ):
                raise ValueError(
                    f"the {side} dictionary at {h} was built on another token stream "
                    f"({n_seq} sequences) than the {tokens.shape[0]} given: "
                    "atom labels would point at the wrong tokens; pass the tokens it was built on"
                )
    check_pair(base, ft, hooks)
    return _layer_diffs(base, ft, d_base, d_ft, tokens, batch_size, progress)


def _layer_diffs(
    base: Any,
    ft: Any,
    d_base: Mapping[str, ITDA],
    d_ft: Mapping[str, ITDA],
    tokens: Tensor,
    batch_size: int,
    progress: bool,
) -> list[LayerDiff]:
    """Score a checked pair of dictionary sets over the stream they were built on."""
    scores = token_scores(base, ft, d_base, d_ft, tokens, batch_size=batch_size, progress=progress)
    return [LayerDiff(h, d_base[h], d_ft[h], scores[h]) for h in scores]
