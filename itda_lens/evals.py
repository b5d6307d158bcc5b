"""Thin, offline wrappers around sae_lens's ``run_evals`` (and SAEBench's core eval), and the
scores of a transcoder spliced into its model (:func:`transcoder_scores`).

All are fed from an in-memory token tensor, so nothing touches the hub. A transcoder (a sae_lens
``Transcoder``: it reads ``hook_name`` and writes ``hook_name_out``) is scored by
:func:`transcoder_scores`; ``run_evals`` and SAEBench's core eval, which score an SAE's
reconstruction of the hook it reads, refuse it. Metrics come back flat
(``ce_loss_score``, ``kl_div_score``, ``explained_variance``, ``l0``, ...). sae_lens >= 6.54 counts
L0/L1/density with ``!= 0`` / ``abs``, so signed ITDA codes are measured correctly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from datasets import Dataset
from jaxtyping import Int
from sae_lens import SAE, HookedSAETransformer
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.transcoder import Transcoder
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor
from transformer_lens import HookedRootModule

from itda_lens.activations import check_hook_names, special_token_ids
from itda_lens.analysis import fvu
from itda_lens.probing import ProbeData, mean_over_tasks, pooled_features, sparse_probe
from itda_lens.saes import ITDA

try:  # SAEBench is an optional extra (itda_lens[saebench])
    from sae_bench.evals.core import main as saebench_core_main
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
except ImportError:  # pragma: no cover
    saebench_core_main = None

CORE_METRICS = (
    "ce_loss_score",
    "kl_div_score",
    "explained_variance",
    "l0",
    "mse",
    "cossim",
    "ce_loss_with_sae",
    "ce_loss_without_sae",
    "ce_loss_with_ablation",
)


@contextmanager
def _quiet_store() -> Iterator[None]:
    """Silence two ActivationsStore warnings that are noise when evaluating a fixed token set
    (its training-sample budget, and a tensor copy inside sae_lens)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "The training dataset contains fewer samples", UserWarning
        )
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        yield


def activation_store(
    model: HookedRootModule,
    sae: SAE[Any],
    tokens: Int[Tensor, "n seq"],
    batch_size_prompts: int = 8,
) -> ActivationsStore:
    """An ActivationsStore over a token tensor (pre-tokenised rows are used as they are)."""
    require_hook_name(sae)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, seq_len], got {tuple(tokens.shape)}")
    ds = Dataset.from_dict({"tokens": tokens.tolist()})
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset=ds,
        streaming=False,
        store_batch_size_prompts=batch_size_prompts,
        context_size=tokens.shape[1],
        n_batches_in_buffer=4,
        total_tokens=tokens.numel(),
    )


def require_hook_name(sae: SAE[Any]) -> str:
    """The hook the SAE reads, or a clear error saying how to set it (sae_lens would only say
    "hook_name is required", or, in ``model.add_sae``, log a warning and attach nothing)."""
    hook = sae.cfg.metadata.hook_name
    if hook:
        return hook
    how = (
        "pass hook_name= to ITDA.from_atoms (metadata={'hook_name': ...} to "
        "build_itda_from_activations), or set itda.cfg.metadata.hook_name"
        if isinstance(sae, ITDA)
        else "set sae.cfg.metadata.hook_name"
    )
    name = "ITDA" if isinstance(sae, ITDA) else type(sae).__name__
    raise ValueError(
        f"this {name} has no hook_name, so it cannot be run inside a model: {how} "
        "(e.g. 'blocks.1.hook_resid_post')"
    )


def refuse_transcoder(sae: SAE[Any], what: str) -> None:
    """A clear error where ``what`` (an SAE eval: a reconstruction of the hook it reads) is given a
    transcoder, which reads one hook and writes another."""
    if isinstance(sae, Transcoder):
        meta = sae.cfg.metadata
        raise ValueError(
            f"{what} scores an SAE's reconstruction of the hook it reads; this "
            f"{type(sae).__name__} is a transcoder ({meta.hook_name} -> {meta.hook_name_out}): "
            "score it with itda_lens.evals.transcoder_scores (evaluate_all does, without core)"
        )


def evaluate(
    sae: SAE[Any],
    model: HookedRootModule,
    tokens: Int[Tensor, "n seq"],
    *,
    batch_size_prompts: int = 8,
    exclude_token_ids: list[int] | None = None,
    featurewise: bool = False,
) -> dict[str, float]:
    """sae_lens ``run_evals`` on all of ``tokens``: CE-loss score, KL score, explained variance, L0, ...

    Reconstructions are spliced in only at positions whose token is not excluded (default: the
    tokenizer's BOS/EOS/PAD), and only those positions count in the metrics. A transcoder is
    refused (:func:`transcoder_scores` scores it).
    """
    refuse_transcoder(sae, "evaluate (sae_lens run_evals)")
    n_batches = max(1, tokens.shape[0] // batch_size_prompts)
    cfg = EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=featurewise,
        compute_featurewise_weight_based_metrics=featurewise,
    )
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    with torch.no_grad(), _quiet_store():
        nested, _ = run_evals(
            sae,
            activation_store(model, sae, tokens, batch_size_prompts),
            model,
            ActivationScaler(),
            cfg,
            exclude_special_tokens=excluded,
        )
    return _finite_metrics(nested, prefix=False)


def saebench_core(
    sae: SAE[Any],
    model: HookedRootModule,
    tokens: Int[Tensor, "n seq"],
    batch_size_prompts: int = 8,
) -> dict[str, float]:
    """SAEBench's ``core`` eval, called directly with an in-memory activation store (offline).

    SAEBench counts L1 as a signed sum and density / alive latents with ``> 0``, so for signed ITDA
    codes prefer sae_lens's numbers for L1 and density; L0, CE and variance metrics agree.
    """
    refuse_transcoder(sae, "SAEBench's core eval")
    if saebench_core_main is None:
        raise ImportError("SAEBench is not installed: pip install 'itda_lens[saebench]'")
    missing = [k for k in ("model_name", "hook_name") if not getattr(sae.cfg.metadata, k, None)]
    if missing:
        raise ValueError(
            f"SAEBench needs cfg.metadata.{' and '.join(missing)}; set it on the SAE (or pass "
            "model_name= / hook_name= when building or training it)"
        )
    load_and_format_sae("itda_lens", sae, str(sae.device))
    n_batches = max(1, tokens.shape[0] // batch_size_prompts)
    cfg = CoreEvalConfig(
        model_name=sae.cfg.metadata.model_name or "model",
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        context_size=tokens.shape[1],
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    with torch.no_grad(), _quiet_store():
        nested, _ = saebench_core_main.run_evals(
            sae,
            activation_store(model, sae, tokens, batch_size_prompts),
            model,
            cfg,
            ignore_tokens=set(special_token_ids(model)),
        )
    return _finite_metrics(nested, prefix=True)


def _finite_metrics(nested: dict[str, dict[str, Any]], *, prefix: bool) -> dict[str, float]:
    """The finite numeric metrics of grouped eval output, keyed ``group.name`` or ``name``."""
    return {
        f"{group}.{k}" if prefix else k: float(v)
        for group, d in nested.items()
        for k, v in d.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }


def evaluate_all(
    sae: SAE[Any],
    model: HookedRootModule,
    heldout_tokens: Int[Tensor, "n seq"],
    *,
    probe: ProbeData | None = None,
    core: bool = False,
) -> dict[str, Any]:
    """sae_lens ``run_evals`` on held-out text, k-sparse probing and (optionally) SAEBench core.

    A transcoder gets :func:`transcoder_scores` (under ``"transcoder_scores"``) instead of
    ``run_evals``, and probing of its codes at its input hook; ``core`` is refused for it.
    """
    if isinstance(sae, Transcoder):
        if core:
            refuse_transcoder(sae, "SAEBench's core eval (core=True)")
        scores = transcoder_scores(sae, model, heldout_tokens)  # type: ignore[arg-type]
        out: dict[str, Any] = {"transcoder_scores": scores}
    else:
        out = {"run_evals": evaluate(sae, model, heldout_tokens)}
    if probe is not None:
        hook = sae.cfg.metadata.hook_name
        feats = pooled_features(sae.encode, model, probe.tokens, hook)
        per_task = sparse_probe(feats, probe)
        out["probing"] = {"mean": mean_over_tasks(per_task), "tasks": per_task}
    if core:
        out["saebench_core"] = saebench_core(sae, model, heldout_tokens)
    return out


@torch.no_grad()
def transcoder_scores(
    transcoder: Transcoder,
    model: HookedSAETransformer,
    tokens: Int[Tensor, "n seq"],
    *,
    batch_size: int = 8,
    exclude_token_ids: list[int] | None = None,
) -> dict[str, float]:
    """How well a transcoder stands in for the model between its two hooks, on ``tokens``.

    The losses are the mean next-token CE over all of ``tokens`` (as ``model(tokens,
    return_type="loss")``): ``ce_loss_without_sae`` (the model), ``ce_loss_with_sae`` (the
    transcoder spliced in with ``HookedSAETransformer.add_sae``, so the output hook holds its
    decoding of the input hook), ``ce_loss_with_ablation`` (the output hook zeroed),
    ``ce_loss_with_error_term`` (spliced with ``use_error_term=True``: equals the clean loss, a
    check of the splice) and ``ce_loss_score``, the fraction of the ablation's loss the transcoder
    recovers, ``(ablation - with_sae) / (ablation - without_sae)``. The names are sae_lens's
    ``run_evals`` ones. ``fvu`` (of the output hook), ``l0`` (mean non-zero codes per token) and
    ``dead_fraction`` (latents never non-zero) are read at ``n_tokens`` positions.

    Special tokens (default: the tokenizer's BOS/EOS/PAD) are left alone everywhere: neither
    spliced, ablated nor scored, as in :func:`evaluate`. The model is restored afterwards.
    """
    hook_in, hook_out = require_hook_name(transcoder), transcoder.cfg.metadata.hook_name_out
    if not isinstance(transcoder, Transcoder) or not hook_out or hook_out == hook_in:
        raise ValueError(
            f"transcoder_scores needs a transcoder (metadata hook_name_out, the hook it writes, "
            f"other than hook_name); got a {type(transcoder).__name__} writing {hook_out!r}"
        )
    if not isinstance(model, HookedSAETransformer):
        raise TypeError(
            "transcoder_scores splices through HookedSAETransformer.add_sae; got a "
            f"{type(model).__name__} (zoo.load_model gives a HookedSAETransformer)"
        )
    if model.acts_to_saes:
        raise ValueError(
            f"the model has SAEs attached at {sorted(model.acts_to_saes)}, so its loss is not the "
            "clean one: call model.reset_saes() first"
        )
    check_hook_names(model, [hook_in, hook_out])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, seq_len >= 2], got {tuple(tokens.shape)}")
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    ids = torch.tensor(excluded, dtype=torch.long)
    batches = [(b, ~torch.isin(b.cpu(), ids)) for b in tokens.split(batch_size)]
    if not any(bool(keep.any()) for _, keep in batches):
        raise ValueError("no token of `tokens` is scored: all of them are excluded special tokens")

    def mean_loss(run: Callable[[Tensor, Tensor], Tensor]) -> float:
        total = sum(float(run(b, keep).double().sum()) for b, keep in batches)
        return total / (tokens.shape[0] * (tokens.shape[1] - 1))

    ys: list[Tensor] = []
    y_hats: list[Tensor] = []
    used = torch.zeros(transcoder.cfg.d_sae, dtype=torch.bool)
    n_codes = 0

    def clean(batch: Tensor, keep: Tensor) -> Tensor:
        """The model's loss; on the way, the transcoder's codes and outputs at the scored tokens."""
        nonlocal n_codes
        loss, cache = model.run_with_cache(
            batch, names_filter=[hook_in, hook_out], return_type="loss", loss_per_token=True
        )
        x, y = (cache[h][keep.to(cache[h].device)] for h in (hook_in, hook_out))
        codes = transcoder.encode(x.to(transcoder.W_dec.device, transcoder.W_dec.dtype))
        nonzero = (codes != 0).cpu()
        n_codes += int(nonzero.sum())
        used.logical_or_(nonzero.any(0))
        y_hats.append(transcoder.decode(codes).float().cpu())
        ys.append(y.float().cpu())
        return loss

    def ablated(batch: Tensor, keep: Tensor) -> Tensor:
        def zero(act: Tensor, hook: Any) -> Tensor:
            return act.masked_fill(keep.to(act.device)[..., None], 0.0)

        return model.run_with_hooks(
            batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_out, zero)]
        )

    def spliced(error_term: bool) -> float:
        model.add_sae(transcoder, use_error_term=error_term, exclude_special_tokens=excluded)
        try:
            return mean_loss(lambda b, _: model(b, return_type="loss", loss_per_token=True))
        finally:
            model.reset_saes([hook_in])

    without = mean_loss(clean)
    with_sae, ablation = spliced(False), mean_loss(ablated)
    y = torch.cat(ys)
    lost = ablation - without
    return {
        "ce_loss_without_sae": without,
        "ce_loss_with_sae": with_sae,
        "ce_loss_with_ablation": ablation,
        "ce_loss_with_error_term": spliced(True),
        "ce_loss_score": (ablation - with_sae) / lost if lost else math.nan,
        "fvu": fvu(y, torch.cat(y_hats)),
        "l0": n_codes / y.shape[0],
        "dead_fraction": 1 - float(used.float().mean()),
        "n_tokens": float(y.shape[0]),
    }
