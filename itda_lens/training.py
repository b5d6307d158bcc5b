"""Comparison SAEs trained with sae_lens's own trainer, offline, from cached activations.

``train_sae`` feeds shuffled batches of :class:`~itda_lens.activations.CachedActivations` (from
``collect_activations``) to ``sae_lens.SAETrainer`` and
returns the *inference* SAE that sae_lens saves and loads (BatchTopK comes back as JumpReLU), with
the metadata evals need. Architectures: TopK, BatchTopK, AbsTopK (signed top-k by |pre-activation|)
and matching pursuit (a trained dictionary, tied encoder, at most ``k`` greedy MP steps). Caching
once is what makes sweeps of many SAEs affordable on a CPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from sae_lens import (
    SAE,
    AbsTopKTrainingSAEConfig,
    BatchTopKTrainingSAEConfig,
    MatchingPursuitTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from itda_lens.activations import CachedActivations, set_metadata

TrainArchitecture = Literal["topk", "batchtopk", "abstopk", "matching_pursuit"]
TRAIN_ARCHITECTURES: tuple[TrainArchitecture, ...] = get_args(TrainArchitecture)


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
