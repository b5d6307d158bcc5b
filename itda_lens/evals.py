"""Thin, offline wrappers around sae_lens's ``run_evals`` (and SAEBench's core eval).

Both are fed from an in-memory token tensor, so nothing touches the hub. Metrics come back flat
(``ce_loss_score``, ``kl_div_score``, ``explained_variance``, ``l0``, ...). sae_lens >= 6.54 counts
L0/L1/density with ``!= 0`` / ``abs``, so signed ITDA codes are measured correctly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset
from jaxtyping import Int
from sae_lens import SAE
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor
from transformer_lens import HookedRootModule

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


def activation_store(
    model: HookedRootModule,
    sae: SAE[Any],
    tokens: Int[Tensor, "n seq"],
    batch_size_prompts: int = 8,
) -> ActivationsStore:
    """An ActivationsStore over a token tensor (pre-tokenised rows are used as they are)."""
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


def special_token_ids(model: HookedRootModule) -> list[int]:
    tok = getattr(model, "tokenizer", None)
    ids = (
        {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if tok
        else set()
    )
    return sorted(i for i in ids if i is not None)


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
    tokenizer's BOS/EOS/PAD), and only those positions count in the metrics.
    """
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
    with torch.no_grad():
        nested, _ = run_evals(
            sae,
            activation_store(model, sae, tokens, batch_size_prompts),
            model,
            ActivationScaler(),
            cfg,
            exclude_special_tokens=excluded,
        )
    flat = {k: v for group in nested.values() for k, v in group.items()}
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
