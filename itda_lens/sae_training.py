"""Comparison SAEs trained with sae_lens's own trainer, offline, from cached activations.

``collect_activations`` runs the model once and keeps the activations at one hook (special-token
positions dropped); ``train_sae`` feeds shuffled batches of them to ``sae_lens.SAETrainer`` and
returns the *inference* SAE that sae_lens saves and loads (BatchTopK comes back as JumpReLU), with
the metadata evals need. Architectures: TopK, BatchTopK, AbsTopK (signed top-k by |pre-activation|)
and matching pursuit (a trained dictionary, tied encoder, at most ``k`` greedy MP steps). Caching
once is what makes sweeps of many SAEs affordable on a CPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from sae_lens import (
    SAE,
    AbsTopKTrainingSAEConfig,
    BatchTopKTrainingSAEConfig,
    MatchingPursuitTrainingSAEConfig,
    SAEConfig,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from transformer_lens import HookedRootModule

from itda_lens.sources import (
    TokenInput,
    hook_activations,
    special_token_ids,
    stop_at_layer,
    token_batches,
)

USAGE_KEYS = ("hook_name", "model_name", "context_size", "prepend_bos")

TrainArchitecture = Literal["topk", "batchtopk", "abstopk", "matching_pursuit"]
TRAIN_ARCHITECTURES: tuple[TrainArchitecture, ...] = get_args(TrainArchitecture)


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
    stop = stop_at_layer([hook_name])
    skip = torch.tensor(special_token_ids(model), dtype=torch.long)
    chunks, ids, seconds, kept, seq = [], [], 0.0, 0, 0
    tokenizer = getattr(model, "tokenizer", None)
    for batch in token_batches(tokens, batch_size, context_size=context_size, tokenizer=tokenizer):
        t0 = time.perf_counter()
        acts = hook_activations(model, batch, [hook_name], stop)[hook_name]
        seconds += time.perf_counter() - t0
        keep = ~torch.isin(batch.reshape(-1).cpu(), skip)
        chunks.append(acts.reshape(-1, acts.shape[-1])[keep.to(acts.device)].float().cpu())
        ids.append(batch.reshape(-1).cpu()[keep])
        kept += int(keep.sum())
        seq = batch.shape[1]
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


def shuffled_batches(acts: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless epochs of shuffled activation batches (a sae_lens DataProvider)."""
    if acts.shape[0] < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} activations, got {acts.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=g)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[start : start + batch_size]]


@dataclass
class TrainedSAE:
    sae: SAE[Any]
    train_seconds: float
    training_tokens: int


def training_config(
    architecture: TrainArchitecture, *, d_in: int, d_sae: int, k: int, device: str
) -> TrainingSAEConfig:
    """The sae_lens training config for ``architecture`` at L0 budget ``k``.

    Matching pursuit has no ``k``: it runs ``max_iterations = k`` greedy steps with the residual
    stop off (``residual_threshold = 0``, so it never stops early on a small residual, only when
    the support stops changing), i.e. at most ``k`` active latents, like ITDA at the same ``k``.
    sae_lens forces its decoder to unit-norm initialisation (``decoder_init_norm = 1``).
    """
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "normalize_activations": "expected_average_only_in",
        "device": device,
    }
    if architecture == "matching_pursuit":
        return MatchingPursuitTrainingSAEConfig(
            max_iterations=k, residual_threshold=0.0, decoder_init_norm=1.0, **common
        )
    cfg_cls: dict[str, type[TopKTrainingSAEConfig]] = {
        "topk": TopKTrainingSAEConfig,
        "batchtopk": BatchTopKTrainingSAEConfig,
        "abstopk": AbsTopKTrainingSAEConfig,
    }
    if architecture not in cfg_cls:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(TRAIN_ARCHITECTURES)}"
        )
    return cfg_cls[architecture](k=k, **common)


def train_sae(
    cached: CachedActivations,
    *,
    architecture: TrainArchitecture = "topk",
    d_sae: int,
    k: int,
    training_tokens: int,
    batch_size: int = 2048,
    lr: float = 1e-3,
    seed: int = 0,
    model_name: str | None = None,
    device: str = "cpu",
) -> TrainedSAE:
    """Train a TopK, BatchTopK, AbsTopK or matching-pursuit SAE with ``sae_lens.SAETrainer`` on the
    cached activations (``k`` is the L0 budget; see ``training_config``).

    Settings follow what worked offline at this scale: Adam at ``lr`` with 5% warm-up and a linear
    decay over the last 20%, activations normalised to ``sqrt(d)`` (folded in afterwards), the
    default aux-k loss against dead latents (none for matching pursuit). Returns the inference SAE,
    loaded back through disk.
    """
    sae_cfg = training_config(
        architecture, d_in=cached.acts.shape[1], d_sae=d_sae, k=k, device=device
    )
    torch.manual_seed(seed)
    sae = TrainingSAE.from_dict(sae_cfg.to_dict())
    steps = max(1, training_tokens // batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_warm_up_steps=min(100, steps // 20),
        lr_decay_steps=steps // 5,
        device=device,
        n_batches_for_norm_estimate=min(50, max(1, cached.acts.shape[0] // batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, shuffled_batches(cached.acts, batch_size, seed))
    t0 = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - t0
    set_metadata(
        trained.cfg,
        {
            **cached.usage_metadata(model_name),
            "hook_head_index": None,
            "model_from_pretrained_kwargs": {},
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device=device)
    return TrainedSAE(inference, seconds, steps * batch_size)
