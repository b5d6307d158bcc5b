"""The ITDA transcoder build: pairs ``(x, y)`` of a model's activations at an input and an output
hook, read in one forward pass, and the exact sequential add rule over them.

In stream order, each token's input ``x`` is encoded by ``k``-step pursuit over the input atoms
added before it, and the token joins as a new pair when the reconstruction is poor: judged on the
output, ``cos(y_hat, y) < cos_threshold`` with ``y_hat = sum_i c_i W_dec[i]`` (``judge="output"``),
or on the input, ``cos(x_hat, x) < cos_threshold`` (``judge="input"``: the ITDA's rule on ``x``).
A zero reconstruction (or a zero target) has cosine 0, so it is always poor. The first eligible
token with a non-zero ``x`` starts the dictionary; excluded tokens (BOS and PAD unless
``exclude_special_tokens=False``) and zero inputs never become atoms but count as tokens read.

Each token is judged, in ``decision_dtype`` (float64 by default), over the atoms added before it:
batches only group the forward pass, so the dictionary does not depend on ``batch_size``. The work
is the ITDA builder's (:class:`TranscoderBuilder` subclasses :class:`~itda_lens.builder.rule.
ITDABuilder`): sub-batches are scored in one pass and a token is pursued again only if an atom
added after its scoring enters its pursuit path, since a verdict depends on the dictionary only
through that path; judged on the input, the rule runs in the ITDA's CPU kernel.

Sizing (``target_atoms``), the skip term (``skip_connection``) and the refitted decoder
(``refit_decoder``) are fitted on a sample: the first ``target_sample_tokens`` tokens of the
stream, read once and then streamed again by the build.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens.activations import (
    HookBatch,
    TokenInput,
    excluded_token_ids,
    iter_hook_activations,
)
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.builder.target import ThresholdSearch, find_threshold
from itda_lens.pursuit import SparseCode, decode, pursue
from itda_lens.saes import TRANSCODER_BUILD_KEY, ITDATranscoder, TranscoderBuildRecord
from itda_lens.saes.itda_transcoder import Judge

JUDGES = ("output", "input")


@dataclass
class TranscoderBuilder(ITDABuilder):
    """The exact sequential rule over ``(x, y)`` pairs: the ITDA builder over the inputs (atoms,
    provenance, Gram rows, sub-batch scoring), with each batch's ``outputs`` and, beside the input
    atoms, the output atoms ``y / |x|``; the verdict reads the output (``judge="output"``) or the
    input (``"input"``, which is the ITDA's rule and may run in its CPU kernel)."""

    d_out: int = 1
    judge: Judge = "output"
    _out: Tensor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._out = torch.empty(64, self.d_out, device=self.store.device, dtype=self.store.dtype)

    @property
    def outputs(self) -> Float[Tensor, "n d_out"]:
        """The output atoms ``y_i / |x_i|`` (the transcoder's ``W_dec``)."""
        return self._out[: len(self.store)]

    @property
    def use_kernel(self) -> bool:
        return self.judge == "input" and super().use_kernel

    def read(self, batch: ActivationBatch, pos: Tensor, end: int) -> int:
        y = batch.outputs
        if y is None or y.ndim != 2 or y.shape != (batch.acts.shape[0], self.d_out):
            got = None if y is None else tuple(y.shape)
            raise ValueError(
                f"a transcoder batch needs outputs [{batch.acts.shape[0]}, {self.d_out}], got {got}"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"outputs contain NaN or Inf (batch {self.n_batches})")
        return super().read(
            batch._replace(outputs=y.to(self.store.device, self.store.dtype)), pos, end
        )

    def poor(self, xs: Tensor, ys: Tensor | None, code: SparseCode) -> Tensor:
        if self.judge == "input":
            return super().poor(xs, ys, code)
        assert ys is not None
        cos = F.cosine_similarity(ys, decode(code, self.outputs), dim=1, eps=1e-30)
        return cos < self.cfg.cos_threshold

    def added(self, x: Tensor, rows: Tensor, batch: ActivationBatch) -> None:
        assert batch.outputs is not None
        m = len(self.store)
        n = m - len(rows)
        if m > self._out.shape[0]:
            grown = self._out.new_empty(max(m, 2 * self._out.shape[0]), self.d_out)
            grown[:n] = self._out[:n]
            self._out = grown
        rows = rows.to(x.device)
        self._out[n:m] = batch.outputs[rows] / x[rows].norm(dim=1, keepdim=True)

    def to_transcoder(self, **options: Any) -> ITDATranscoder:
        """The built pairs as an :class:`~itda_lens.saes.ITDATranscoder` in the config's dtype."""
        common = self.atom_options()
        return ITDATranscoder.from_pairs(
            self.store.atoms, self.outputs, self.cfg.k, **common, **options
        )


class Pairs(NamedTuple):
    """A sample of the stream's pairs: inputs that may become atoms and their outputs."""

    x: Float[Tensor, "n d_in"]
    y: Float[Tensor, "n d_out"]


def build_itda_transcoder(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_in: str,
    hook_out: str,
    cfg: BuildConfig | None = None,
    *,
    judge: Judge = "output",
    skip_connection: bool = False,
    refit_decoder: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> ITDATranscoder:
    """Build an ITDA transcoder from ``hook_in`` to ``hook_out`` of a model (module doc).

    ``cfg`` holds the build settings (:class:`~itda_lens.BuildConfig`; keyword arguments override
    its fields, as for :func:`~itda_lens.build_itda`): ``k``, ``cos_threshold`` or
    ``target_atoms`` (searched on the first ``target_sample_tokens`` tokens, then the build stops
    at that many atoms), ``encoder``, ``batch_size``, ``context_size``, ``max_tokens``,
    ``max_atoms``, ``patience_tokens``, ``exclude_special_tokens``, ``dtype``, ``decision_dtype``
    and ``device`` (where the rule runs; default CPU) are honoured; ``refine`` and
    ``add_rule="batch"`` are refused. ``tokens`` is any token input
    :func:`~itda_lens.build_itda` takes.

    ``skip_connection``: fit a linear term ``y ~ x @ W_skip.T + b`` by least squares on the
    sample first; the pairs' outputs (and the output judge) are then what it leaves.
    ``refit_decoder``: after the build, replace the output atoms by the least-squares decoder of
    the sample's outputs from its codes (:func:`fit_decoder`; atoms no code uses keep their pair).
    The transcoder carries its :class:`~itda_lens.saes.TranscoderBuildRecord` and each input
    atom's provenance.
    """
    cfg = (cfg or BuildConfig()).replace(**overrides)
    _check_settings(cfg, judge, hook_in, hook_out)
    excluded = excluded_token_ids(model, "auto" if cfg.exclude_special_tokens else None)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    total = math.ceil(len(tokens) / cfg.batch_size) if isinstance(tokens, Tensor) else None
    builder: TranscoderBuilder | None = None
    forward_seconds, context_size, starts_with_bos = 0.0, None, bos is not None
    batches: Iterator[HookBatch] = iter(
        iter_hook_activations(
            model,
            tokens,
            [hook_in, hook_out],
            batch_size=cfg.batch_size,
            context_size=cfg.context_size,
            skip_token_ids=excluded,
        )
    )
    dt = cfg.torch_decision_dtype
    head: list[HookBatch] = []
    sample: Pairs | None = None
    skip: tuple[Tensor, Tensor] | None = None
    search: ThresholdSearch | None = None
    if skip_connection or refit_decoder or cfg.target_atoms is not None:
        head, sample = _read_pairs(batches, hook_in, hook_out, cfg)
        batches = itertools.chain(head, batches)
        forward_seconds = sum(hb.forward_seconds for hb in head)  # read once, whether built or not
        if skip_connection:
            skip = fit_skip(sample.x, sample.y)
        if cfg.target_atoms is not None:
            make = functools.partial(TranscoderBuilder, d_out=sample.y.shape[1], judge=judge)
            search = find_threshold(
                sample.x, cfg, cfg.target_atoms, outputs=_residual(sample, skip).y, make=make
            )
            cap = (
                cfg.target_atoms if cfg.max_atoms is None else min(cfg.max_atoms, cfg.target_atoms)
            )
            cfg = cfg.replace(cos_threshold=search.threshold, max_atoms=cap)
    with tqdm(
        batches, total=total, desc="ITDA transcoder build", unit="batch", disable=not progress
    ) as bar:
        for i, hb in enumerate(bar):
            x, y = (_checked(hb.acts[h], h, i) for h in (hook_in, hook_out))
            if builder is None:
                builder = TranscoderBuilder(
                    x.shape[1], cfg, cfg.device or "cpu", d_out=y.shape[1], judge=judge
                )
            n = x.shape[0]
            if cfg.max_tokens is not None:
                n = min(n, cfg.max_tokens - builder.tokens_seen)
            if i >= len(head):
                forward_seconds += hb.forward_seconds
            context_size = int(hb.labels[:, 1].max()) + 1
            if bos is not None:
                starts_with_bos &= bool((hb.token_ids[hb.labels[:, 1] == 0] == bos).all())
            out = _residual(Pairs(x.to(dt), y.to(dt)), skip).y
            builder.update(ActivationBatch(x, hb.labels, hb.token_ids, hb.keep, out).head(n))
            bar.set_postfix(atoms=len(builder.store))
            if builder.stopped or builder.tokens_seen == cfg.max_tokens:
                break
    if builder is None or len(builder.store) == 0:
        raise ValueError(
            "empty dictionary: no activation was eligible to become an atom (the token input is "
            "empty, or all its tokens are excluded or have zero input activations)"
        )
    record = TranscoderBuildRecord(
        config=cfg.to_dict(),
        judge=judge,
        cos_threshold=cfg.cos_threshold,
        n_atoms=len(builder.store),
        tokens_seen=builder.tokens_seen,
        tokens_scored=builder.tokens_scored,
        stop_reason=builder.stop_reason,
        excluded_token_ids=excluded,
        forward_seconds=round(forward_seconds, 3),
        dictionary_seconds=round(builder.seconds, 3),
        skip_connection=skip is not None,
        decoder="lstsq" if refit_decoder else "pairs",
        sample_pairs=None if sample is None else sample.x.shape[0],
        search=None if search is None else _search_dict(search),
    )
    transcoder = builder.to_transcoder(
        hook_name=hook_in,
        hook_name_out=hook_out,
        model_name=model_name or getattr(getattr(model, "cfg", None), "model_name", None),
        context_size=context_size,
        prepend_bos=starts_with_bos,
        dataset_path=dataset_path,
        metadata={TRANSCODER_BUILD_KEY: record.to_dict()},
    )
    if skip is not None:
        transcoder.with_skip(*skip)
    if refit_decoder:
        assert sample is not None
        store = builder.store
        code, _ = pursue(cfg.encoder, sample.x, store.atoms, cfg.k, gram=store.rows)
        decoder = fit_decoder(code, _residual(sample, skip).y, builder.outputs)
        transcoder.W_dec.data = decoder.to(transcoder.W_dec)
    return transcoder


def fit_skip(
    x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"], ridge: float = 1e-6
) -> tuple[Float[Tensor, "d_out d_in"], Float[Tensor, " d_out"]]:
    """The least-squares linear map ``y ~ x @ W.T + b`` (float64, ridge ``ridge`` relative to the
    mean input variance, which only guards a rank-deficient sample): ``(W, b)``."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-300))
    gram.diagonal().add_(lam)
    w = torch.linalg.solve(gram, xc.T @ (y - my))  # [d_in, d_out]
    return w.T.contiguous(), my - mx @ w


def fit_decoder(
    code: SparseCode,
    targets: Float[Tensor, "n d_out"],
    init: Float[Tensor, "m d_out"],
    *,
    ridge: float = 1e-3,
    tol: float = 1e-8,
    max_iter: int = 500,
    chunk: int = 4096,
    dense_bytes: int = 512 * 2**20,
) -> Float[Tensor, "m d_out"]:
    """The decoder ``D`` minimising ``|C D - targets|^2 + lam |D - init|^2`` for the codes ``C``
    (sparse, ``[n, k]`` into ``m`` atoms), with ``lam = ridge`` x the mean squared code norm per
    used atom: atoms no code uses keep ``init``. In float64: while ``C^T C`` [m, m] fits
    ``dense_bytes``, formed from the codes and solved by Cholesky; beyond, Jacobi-preconditioned
    conjugate gradients on the normal equations without forming it (memory ``O(m d_out)``), to a
    relative residual of ``tol``."""
    idx, val = code.indices.reshape(-1, code.indices.shape[-1]), code.values.double()
    val = val.reshape(idx.shape)
    t = targets.double()
    d0 = init.double()
    m = d0.shape[0]
    if idx.shape[0] != t.shape[0]:
        raise ValueError(f"{idx.shape[0]} codes but {t.shape[0]} targets")

    def ct(rows: Tensor) -> Tensor:  # C^T rows
        out = d0.new_zeros(m, d0.shape[1])
        for s in range(0, idx.shape[0], chunk):
            i, v = idx[s : s + chunk], val[s : s + chunk]
            out.index_add_(
                0, i.flatten(), (v.unsqueeze(-1) * rows[s : s + chunk, None]).flatten(0, 1)
            )
        return out

    def c(d: Tensor) -> Tensor:  # C d
        return torch.cat(
            [
                decode(SparseCode(idx[s : s + chunk], val[s : s + chunk]), d)
                for s in range(0, idx.shape[0], chunk)
            ]
        )

    diag = d0.new_zeros(m).index_add_(0, idx.flatten(), (val**2).flatten())
    used = diag > 0
    lam = ridge * float(diag[used].mean()) if bool(used.any()) else 1.0

    def op(d: Tensor) -> Tensor:
        return ct(c(d)) + lam * d

    rhs = ct(t) + lam * d0
    if m * m * 8 <= dense_bytes:
        gram = d0.new_zeros(m * m)
        for s in range(0, idx.shape[0], chunk):
            i, v = idx[s : s + chunk], val[s : s + chunk]
            flat = (i.unsqueeze(-1) * m + i.unsqueeze(-2)).flatten()
            gram.index_add_(0, flat, (v.unsqueeze(-1) * v.unsqueeze(-2)).flatten())
        gram = gram.view(m, m)
        gram.diagonal().add_(lam)
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))
    precond = 1 / (diag + lam)
    d = d0.clone()
    r = rhs - op(d)
    z = precond[:, None] * r
    p = z.clone()
    rz = (r * z).sum(0)
    norm = rhs.norm(dim=0).clamp_min(1e-300)
    for _ in range(max_iter):
        if bool((r.norm(dim=0) <= tol * norm).all()):
            break
        ap = op(p)
        alpha = rz / (p * ap).sum(0).clamp_min(1e-300)
        d += alpha * p
        r -= alpha * ap
        z = precond[:, None] * r
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return d


def _residual(pairs: Pairs, skip: tuple[Tensor, Tensor] | None) -> Pairs:
    """The pairs with the skip term's prediction taken from their outputs."""
    if skip is None:
        return pairs
    w, b = skip
    x = pairs.x.to(w)
    return Pairs(pairs.x, pairs.y.to(w) - x @ w.T - b)


def _read_pairs(
    batches: Iterator[HookBatch], hook_in: str, hook_out: str, cfg: BuildConfig
) -> tuple[list[HookBatch], Pairs]:
    """The stream's first ``target_sample_tokens`` tokens (at most ``max_tokens``): the batches
    read (to be streamed again) and their pairs whose input may become an atom (eligible,
    non-zero), in ``decision_dtype``."""
    budget = min(cfg.max_tokens or cfg.target_sample_tokens, cfg.target_sample_tokens)
    head: list[HookBatch] = []
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    read = 0
    dt = cfg.torch_decision_dtype
    while read < budget and (hb := next(batches, None)) is not None:
        head.append(hb)
        x, y = (_checked(hb.acts[h], h, len(head) - 1) for h in (hook_in, hook_out))
        n = min(x.shape[0], budget - read)
        read += n
        keep = hb.keep[:n] & (x[:n].norm(dim=1) > 0)
        xs.append(x[:n][keep].to(dt))
        ys.append(y[:n][keep].to(dt))
    if not xs or sum(len(x) for x in xs) == 0:
        raise ValueError(
            "empty sample: no pair in the first target_sample_tokens tokens can become an atom "
            "(the token input is empty, or all its tokens are excluded or have zero inputs)"
        )
    return head, Pairs(torch.cat(xs), torch.cat(ys))


def _search_dict(search: ThresholdSearch) -> dict[str, Any]:
    return {
        "threshold": search.threshold,
        "target": search.target,
        "sample_tokens": search.sample_rows,
        "atoms_on_sample": search.atoms,
        "steps": [list(p) for p in search.history],
        "seconds": round(search.seconds, 3),
    }


def _check_settings(cfg: BuildConfig, judge: object, hook_in: str, hook_out: str) -> None:
    if judge not in JUDGES:
        raise ValueError(f"judge must be 'output' or 'input', got {judge!r}")
    if hook_in == hook_out:
        raise ValueError(
            f"hook_in and hook_out are both {hook_in!r}: a transcoder maps one hook to another "
            "(for one hook build an ITDA with build_itda)"
        )
    unsupported: dict[str, Any] = {}
    if cfg.refine != "none":
        unsupported["refine"] = cfg.refine
    if cfg.add_rule != "exact":
        unsupported["add_rule"] = cfg.add_rule
    if unsupported:
        raise ValueError(
            f"the ITDA transcoder build does not support {unsupported}: it runs the exact rule "
            "(for a fitted decoder use refit_decoder=True)"
        )


def _checked(acts: Float[Tensor, "n d"], hook: str, batch: int) -> Float[Tensor, "n d"]:
    """A hook's activations, refusing NaN or Inf."""
    if not bool(torch.isfinite(acts).all()):
        raise ValueError(f"activations at {hook} contain NaN or Inf (batch {batch})")
    return acts
