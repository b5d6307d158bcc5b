"""Comparison SAEs trained with sae_lens's own trainer, offline, from cached activations.

``train_sae`` feeds shuffled batches of :class:`~itda_lens.activations.CachedActivations` (from
``collect_activations``) to ``sae_lens.SAETrainer`` and
returns the *inference* SAE that sae_lens saves and loads (BatchTopK comes back as JumpReLU), with
the metadata evals need. Architectures: TopK, BatchTopK, AbsTopK (signed top-k by |pre-activation|),
matching pursuit (a trained dictionary, tied encoder, ``k`` greedy MP steps), standard (ReLU + L1)
and JumpReLU (quadratic L0 penalty around ``k``). ``init=`` starts any of them from an ITDA's
atoms (:mod:`itda_lens.warmstart`). Caching once is what makes sweeps of many SAEs affordable on a
CPU.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from sae_lens import (
    SAE,
    AbsTopKTrainingSAEConfig,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    MatchingPursuitTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from itda_lens.activations import CachedActivations, set_metadata
from itda_lens.saes import ITDA
from itda_lens.warmstart import FIT_SAMPLE, InitSource, Rule, init_from, init_rows, resolve_rule

TrainArchitecture = Literal[
    "topk", "batchtopk", "abstopk", "matching_pursuit", "standard", "jumprelu"
]
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

    Matching pursuit has no ``k``: it runs exactly ``max_iterations = k`` greedy steps, stopped
    neither by a small residual (``residual_threshold = 0``) nor by a repeated pick
    (``stop_on_duplicate_support = False``: a re-picked latent adds to its code, as in ITDA's MP;
    sae_lens's default stop cut 3% of held-out tokens short on the zoo model), so at most ``k``
    active latents, like ITDA at the same ``k``. sae_lens forces its decoder to unit-norm
    initialisation (``decoder_init_norm = 1``). JumpReLU uses the quadratic L0 penalty around
    ``target_l0 = k`` (Gemma Scope 2); the standard SAE has no L0 budget, only sae_lens's L1
    coefficient (``k`` is not used).
    """
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "normalize_activations": "expected_average_only_in",
        "device": device,
    }
    if architecture == "matching_pursuit":
        return MatchingPursuitTrainingSAEConfig(
            max_iterations=k,
            residual_threshold=0.0,
            stop_on_duplicate_support=False,
            decoder_init_norm=1.0,
            **common,
        )
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), **common
        )
    if architecture == "standard":
        return StandardTrainingSAEConfig(**common)
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


#: ``on_checkpoint(tokens_trained, seconds_trained, inference_sae)``
CheckpointFn = Callable[[int, float, SAE[Any]], None]


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
    init: InitSource | ITDA | str | Path | None = None,
    init_rule: Rule = "auto",
    checkpoints: int = 0,
    on_checkpoint: CheckpointFn | None = None,
) -> TrainedSAE:
    """Train an SAE of ``architecture`` with ``sae_lens.SAETrainer`` on the cached activations
    (``k`` is the L0 budget; see ``training_config``).

    Settings follow what worked offline at this scale: Adam at ``lr`` with 5% warm-up and a linear
    decay over the last 20%, activations normalised to ``sqrt(d)`` (folded in afterwards), the
    default aux-k loss against dead latents (none for matching pursuit). ``init``: an ITDA, its
    folder, or an :class:`~itda_lens.warmstart.InitSource` to start from by ``init_rule`` (the
    encoder fit reads up to ``FIT_SAMPLE`` of the cached activations on the training scale; the
    record lands in ``metadata["init"]``). ``on_checkpoint`` sees the inference SAE as it stands at
    0 tokens and at sae_lens's ``checkpoints`` evenly spaced points of this one run, with the
    tokens and seconds trained so far (reporting is not counted, here or in ``train_seconds``).
    Returns the inference SAE, loaded back through disk.
    """
    n = cached.acts.shape[0]
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
        n_batches_for_norm_estimate=min(50, max(1, n // batch_size)),
        n_checkpoints=checkpoints if on_checkpoint is not None else 0,
        checkpoint_path=None,
    )
    usage = {
        **cached.usage_metadata(model_name),
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {},
    }
    trainer: SAETrainer[Any, Any]
    t0, spent = time.perf_counter(), [0.0]  # spent: seconds inside report

    def report(checkpoint_path: Path | None = None) -> None:
        if on_checkpoint is not None:
            t = time.perf_counter()
            scale = trainer.activation_scaler.scaling_factor
            inference = _inference(trainer.sae, usage, device, scale)
            on_checkpoint(trainer.n_training_samples, t - t0 - spent[0], inference)
            spent[0] += time.perf_counter() - t

    trainer = SAETrainer(
        trainer_cfg, sae, shuffled_batches(cached.acts, batch_size, seed), save_checkpoint_fn=report
    )
    if sae.cfg.normalize_activations == "expected_average_only_in":
        # what fit() does first, done here so a warm start is fitted on the training scale
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=sae.cfg.d_in,
            data_provider=trainer.data_provider,
            n_batches_for_norm_estimate=trainer_cfg.n_batches_for_norm_estimate,
        )
    if init is not None:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:FIT_SAMPLE]
        sample = trainer.activation_scaler.scale(cached.acts[pick].to(device))
        init_from(sae, init, init_rule, sample=sample, k=k, hook_name=cached.hook_name)
    report()
    trained = trainer.fit()
    seconds = time.perf_counter() - t0 - spent[0]
    return TrainedSAE(_inference(trained, usage, device), seconds, steps * batch_size)


def _inference(
    sae: TrainingSAE[Any], metadata: Mapping[str, Any], device: str, scale: float | None = None
) -> SAE[Any]:
    """The inference SAE sae_lens saves for ``sae`` (a copy with ``scale``, the activation
    normalisation, folded in when training has not done it yet), with ``metadata``, loaded back
    through disk."""
    if scale is not None:
        sae = copy.deepcopy(sae)
        sae.fold_activation_norm_scaling_factor(scale)
    set_metadata(sae.cfg, metadata)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=device)


def default_width(d_sae: int | None, cached: CachedActivations) -> int:
    """``d_sae``, or the comparison SAEs' default width: 8 x d_model."""
    return d_sae or 8 * cached.acts.shape[1]


@dataclass(frozen=True)
class SAETrainConfig:
    """sae_lens's own trainer (SAETrainer) on the cached activations."""

    d_sae: int | None = None
    """Latents (default 8 x d_model, or the rows --init-from's atoms fill)."""
    k: int = 16
    """L0 budget (TopK's k; the MP SAE's iterations; JumpReLU's target L0; unused by standard)."""
    epochs: int = 4
    """Passes over the cached activations."""
    batch_size: int = 256
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the initialisation and the shuffling."""


def fit_sae(
    cached: CachedActivations,
    cfg: SAETrainConfig,
    *,
    architecture: TrainArchitecture,
    model_name: str | None = None,
    device: str = "cpu",
    init: InitSource | None = None,
    init_rule: Rule = "auto",
) -> SAE[Any]:
    """:func:`train_sae` from its config (the ``itda-lens train`` entry point): width from the
    config, else the rows ``init``'s atoms fill, else 8 x d_model; ``epochs`` passes."""
    n = cached.acts.shape[0]
    width = cfg.d_sae or (
        init_rows(resolve_rule(architecture, init_rule), init.n_atoms)
        if init is not None
        else default_width(None, cached)
    )
    return train_sae(
        cached,
        architecture=architecture,
        d_sae=width,
        k=cfg.k,
        training_tokens=cfg.epochs * n,
        batch_size=min(cfg.batch_size, n),
        lr=cfg.lr,
        seed=cfg.seed,
        model_name=model_name,
        device=device,
        init=init,
        init_rule=init_rule,
    ).sae
