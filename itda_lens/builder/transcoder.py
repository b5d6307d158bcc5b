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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens.activations import TokenInput, excluded_token_ids, iter_hook_activations
from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ActivationBatch, ITDABuilder
from itda_lens.pursuit import SparseCode, decode
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
        if len(self.store) == 0:
            raise ValueError(
                "empty dictionary: no activation was eligible to become an atom (the token input "
                "is empty, or all its tokens are excluded or have zero input activations)"
            )
        return ITDATranscoder.from_pairs(
            self.store.atoms,
            self.outputs,
            self.cfg.k,
            labels=self.store.labels,
            token_ids=self.store.token_ids,
            encoder=self.cfg.encoder,
            dtype=self.cfg.torch_dtype,
            **options,
        )


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
                builder = TranscoderBuilder(
                    x.shape[1], cfg, cfg.device or "cpu", d_out=y.shape[1], judge=judge
                )
            n = x.shape[0]
            if cfg.max_tokens is not None:
                n = min(n, cfg.max_tokens - builder.tokens_seen)
            forward_seconds += hb.forward_seconds
            context_size = int(hb.labels[:, 1].max()) + 1
            if bos is not None:
                starts_with_bos &= bool((hb.token_ids[hb.labels[:, 1] == 0] == bos).all())
            builder.update(ActivationBatch(x, hb.labels, hb.token_ids, hb.keep, y).head(n))
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
