"""The ITDA transcoder build: pairs ``(x, y)`` of a model's activations at an input and an output
hook, read in one forward pass, and the exact sequential add rule over them.

In stream order, each token's input ``x`` is encoded by ``k``-step pursuit over the input atoms
added before it, and the token joins as a new pair when the reconstruction is poor: judged on the
output, ``cos(y_hat, y) < cos_threshold`` with ``y_hat = sum_i c_i W_dec[i]`` (``judge="output"``),
or on the input, ``cos(x_hat, x) < cos_threshold`` (``judge="input"``: the ITDA's rule on ``x``).
A zero reconstruction (or a zero target) has cosine 0, so it is always poor. The first eligible
token with a non-zero ``x`` starts the dictionary; excluded tokens (BOS and PAD unless
``exclude_special_tokens=False``) and zero inputs never become atoms but count as tokens read.

Tokens are judged one at a time, in ``decision_dtype`` (float64 by default), over the atoms added
before them: batches only group the forward pass, so the dictionary does not depend on
``batch_size``. This is the plain form of the rule (one pursuit per token); the ITDA builder's
sub-batch scoring (:mod:`itda_lens.builder.rule`) would apply unchanged, since a verdict depends
on the dictionary only through the token's pursuit path.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens.activations import TokenInput, excluded_token_ids, iter_hook_activations
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch
from itda_lens.dictionary import AtomStore
from itda_lens.pursuit import decode, pursue
from itda_lens.saes import TRANSCODER_BUILD_KEY, ITDATranscoder, TranscoderBuildRecord
from itda_lens.saes.itda_transcoder import Judge

JUDGES = ("output", "input")


class TranscoderBuilder:
    """The exact sequential rule over ``(x, y)`` pairs: feed it rows in stream order with
    :meth:`read`. Input atoms (unit ``x``, with provenance and Gram rows) live in an
    :class:`~itda_lens.dictionary.AtomStore`; the output atoms ``y / |x|`` beside them."""

    def __init__(
        self, d_in: int, d_out: int, cfg: BuildConfig, judge: Judge, device: str | torch.device
    ):
        self.cfg, self.judge = cfg, judge
        dtype = cfg.torch_decision_dtype
        self.store = AtomStore(d_in, device=device, dtype=dtype, max_atoms=cfg.max_atoms)
        self._out = torch.empty(64, d_out, device=device, dtype=dtype)
        self.tokens_seen = 0
        self.tokens_scored = 0
        self.stop_reason: str | None = None
        self.seconds = 0.0

    @property
    def outputs(self) -> Float[Tensor, "n d_out"]:
        """The output atoms ``y_i / |x_i|`` (the transcoder's ``W_dec``)."""
        return self._out[: len(self.store)]

    @property
    def full(self) -> bool:
        return self.cfg.max_atoms is not None and len(self.store) >= self.cfg.max_atoms

    def poor(self, x: Float[Tensor, " d_in"], y: Float[Tensor, " d_out"]) -> bool:
        """Whether the current dictionary reconstructs this token poorly (an empty one always)."""
        if len(self.store) == 0:
            return True
        atoms = self.store.atoms
        code, _ = pursue(self.cfg.encoder, x[None], atoms, self.cfg.k, gram=self.store.rows)
        if self.judge == "output":
            target, recon = y, decode(code, self.outputs)
        else:
            target, recon = x, decode(code, atoms)
        cos = F.cosine_similarity(recon, target[None], dim=1, eps=1e-30)
        return bool(cos.item() < self.cfg.cos_threshold)

    def read(self, batch: ActivationBatch, outputs: Float[Tensor, "n d_out"]) -> None:
        """Judge the stream's next rows in order: ``batch`` holds their inputs (with provenance
        and eligibility), ``outputs`` their outputs. Stops reading at the atom that fills
        ``max_atoms``."""
        start = time.perf_counter()
        try:
            x = batch.acts.to(self.store.device, self.store.dtype)
            y = outputs.to(self.store.device, self.store.dtype)
            keep = batch.eligible.to(x.device) & (x.norm(dim=1) > 0)
            for i in keep.nonzero().flatten().tolist():
                self.tokens_scored += 1
                if self.poor(x[i], y[i]):
                    self._add(x[i], y[i], batch.labels[i : i + 1], batch.token_ids[i : i + 1])
                    if self.full:
                        self.stop_reason = "full"
                        self.tokens_seen += i + 1
                        return
            self.tokens_seen += x.shape[0]
        finally:
            self.seconds += time.perf_counter() - start

    def _add(
        self,
        x: Float[Tensor, " d_in"],
        y: Float[Tensor, " d_out"],
        labels: Int[Tensor, "1 2"],
        token_ids: Int[Tensor, " 1"],
    ) -> None:
        n = len(self.store)
        self.store.add(x[None], labels, token_ids)
        if n == self._out.shape[0]:
            grown = self._out.new_empty(2 * n, self._out.shape[1])
            grown[:n] = self._out
            self._out = grown
        self._out[n] = y / x.norm()


def build_itda_transcoder(
    model: HookedRootModule,
    tokens: TokenInput,
    hook_in: str,
    hook_out: str,
    cfg: BuildConfig | None = None,
    *,
    judge: Judge = "output",
    progress: bool = True,
    model_name: str | None = None,
    dataset_path: str | None = None,
    **overrides: Any,
) -> ITDATranscoder:
    """Build an ITDA transcoder from ``hook_in`` to ``hook_out`` of a model (module doc).

    ``cfg`` holds the build settings (:class:`~itda_lens.BuildConfig`; keyword arguments override
    its fields, as for :func:`~itda_lens.build_itda`): ``k``, ``cos_threshold``, ``encoder``,
    ``batch_size``, ``context_size``, ``max_tokens``, ``max_atoms``, ``exclude_special_tokens``,
    ``dtype``, ``decision_dtype`` and ``device`` (where the rule runs; default CPU) are honoured;
    ``target_atoms``, ``patience_tokens`` and ``add_rule="batch"`` are refused. ``tokens`` is any
    token input :func:`~itda_lens.build_itda` takes. The transcoder carries its
    :class:`~itda_lens.saes.TranscoderBuildRecord` and each atom's provenance.
    """
    cfg = (cfg or BuildConfig()).replace(**overrides)
    _check_settings(cfg, judge, hook_in, hook_out)
    excluded = excluded_token_ids(model, "auto" if cfg.exclude_special_tokens else None)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    total = math.ceil(len(tokens) / cfg.batch_size) if isinstance(tokens, Tensor) else None
    builder: TranscoderBuilder | None = None
    forward_seconds, context_size, starts_with_bos = 0.0, None, bos is not None
    batches = iter_hook_activations(
        model,
        tokens,
        [hook_in, hook_out],
        batch_size=cfg.batch_size,
        context_size=cfg.context_size,
        skip_token_ids=excluded,
    )
    with tqdm(
        batches, total=total, desc="ITDA transcoder build", unit="batch", disable=not progress
    ) as bar:
        for i, hb in enumerate(bar):
            x, y = (_checked(hb.acts[h], h, i) for h in (hook_in, hook_out))
            if builder is None:
                builder = TranscoderBuilder(x.shape[1], y.shape[1], cfg, judge, cfg.device or "cpu")
            n = x.shape[0]
            if cfg.max_tokens is not None:
                n = min(n, cfg.max_tokens - builder.tokens_seen)
            forward_seconds += hb.forward_seconds
            context_size = int(hb.labels[:, 1].max()) + 1
            if bos is not None:
                starts_with_bos &= bool((hb.token_ids[hb.labels[:, 1] == 0] == bos).all())
            builder.read(ActivationBatch(x, hb.labels, hb.token_ids, hb.keep).head(n), y[:n])
            bar.set_postfix(atoms=len(builder.store))
            if builder.stop_reason is not None or builder.tokens_seen == cfg.max_tokens:
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
    )
    return ITDATranscoder.from_pairs(
        builder.store.atoms,
        builder.outputs,
        cfg.k,
        labels=builder.store.labels,
        token_ids=builder.store.token_ids,
        encoder=cfg.encoder,
        hook_name=hook_in,
        hook_name_out=hook_out,
        model_name=model_name or getattr(getattr(model, "cfg", None), "model_name", None),
        context_size=context_size,
        prepend_bos=starts_with_bos,
        dataset_path=dataset_path,
        metadata={TRANSCODER_BUILD_KEY: record.to_dict()},
        dtype=cfg.torch_dtype,
    )


def _check_settings(cfg: BuildConfig, judge: object, hook_in: str, hook_out: str) -> None:
    if judge not in JUDGES:
        raise ValueError(f"judge must be 'output' or 'input', got {judge!r}")
    if hook_in == hook_out:
        raise ValueError(
            f"hook_in and hook_out are both {hook_in!r}: a transcoder maps one hook to another "
            "(for one hook build an ITDA with build_itda)"
        )
    unsupported = {
        name: getattr(cfg, name)
        for name in ("target_atoms", "patience_tokens")
        if getattr(cfg, name) is not None
    }
    if cfg.add_rule != "exact":
        unsupported["add_rule"] = cfg.add_rule
    if unsupported:
        raise ValueError(
            f"the ITDA transcoder build does not support {unsupported}: it runs the exact rule "
            "at a fixed cos_threshold (bound it with max_atoms or max_tokens)"
        )


def _checked(acts: Float[Tensor, "n d"], hook: str, batch: int) -> Float[Tensor, "n d"]:
    """A hook's activations, refusing NaN or Inf."""
    if not bool(torch.isfinite(acts).all()):
        raise ValueError(f"activations at {hook} contain NaN or Inf (batch {batch})")
    return acts
