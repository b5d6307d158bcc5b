"""The typed configs of every command-line job; ``itda_lens.cli`` is generated from them.

A job is a command dataclass (what it reads and writes) plus, where it has one, the library config
of the work itself: ``build`` takes a :class:`~itda_lens.builder.BuildConfig`, each ``train``
architecture its trainer's config (one table, :data:`TRAINERS`). Every field has a one-line doc
(it is the flag's help), so a flag cannot exist without reaching the code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from sae_lens import SAE
from simple_parsing import field

from itda_lens.activations import CachedActivations
from itda_lens.splinterp.kmeans import fit_kmeans_sae, fit_local_pca_sae
from itda_lens.splinterp.pam import PAMSettings, train_pam
from itda_lens.training import TRAIN_ARCHITECTURES, train_sae
from itda_lens.warmstart import InitSource, Rule, init_rows, resolve_rule

MODEL_HELP = (
    "zoo model (default kjv-4l128-s0), model folder, TransformerLens pretrained name, or "
    "hf:NAME_OR_DIR (a Hugging Face causal LM; --hook takes module paths, e.g. transformer.h.1)"
)
DATA_HELP = "kjv (zoo corpus) | kjv:heldout | kjv:SPLIT:VARIANT | .pt/.npy token file | save_to_disk folder | hub name"


@dataclass
class BuildCommand:
    """Build ITDA dictionaries at one or more hook points (one forward pass for all)."""

    hook: list[str] = field(default_factory=list, action="append", nargs=None, type=str)
    """Hook point, e.g. blocks.2.hook_resid_post (repeat the flag for several)."""
    out: str = field(default=None, required=True)
    """Output folder (one sub-folder per hook when several)."""
    model: str | None = None
    """Zoo model (default kjv-4l128-s0), model folder, TransformerLens pretrained name, or
    hf:NAME_OR_DIR (a Hugging Face causal LM; --hook takes its module paths)."""
    data: str | None = field(default=None, alias=["--dataset"])
    """kjv (zoo corpus, default) | kjv:heldout | kjv:SPLIT:planted|epistles (variants) | .pt/.npy token file | save_to_disk folder | hub name."""
    split: str = "train"
    """Dataset split (hub and save_to_disk data)."""
    resume: bool = False
    """Continue an interrupted build from OUT/checkpoint."""


@dataclass
class TrainCommand:
    """Cache activations at a hook, then train one comparison SAE on them."""

    hook: str = field(default=None, required=True)
    """Hook point, e.g. blocks.2.hook_resid_post."""
    out: str = field(default=None, required=True)
    """Output folder (a sae_lens SAE folder)."""
    model: str | None = None
    """Zoo model (default kjv-4l128-s0), model folder, or TransformerLens pretrained name."""
    data: str | None = field(default=None, alias=["--dataset"])
    """kjv (zoo corpus, default) | kjv:heldout | kjv:SPLIT:planted|epistles (variants) | .pt/.npy token file | save_to_disk folder | hub name."""
    split: str = "train"
    """Dataset split (hub and save_to_disk data)."""
    context_size: int | None = None
    """Tokens per sequence."""
    max_tokens: int = 262_144
    """Activations to cache and train on."""
    device: str | None = None
    """Device for the model and the training (default: cuda when present, else cpu)."""
    overwrite: bool = False
    """Replace a non-empty output folder."""
    init_from: str | None = None
    """An ITDA folder built at --hook whose atoms start the SAE (sae_lens trainers only)."""
    init_rule: Rule = "auto"
    """How the atoms start the SAE (itda_lens.warmstart; auto = the measured best per architecture)."""


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


@dataclass(frozen=True)
class KMeansConfig:
    """k-means autoencoder: one latent per cluster (L0 = 1)."""

    d_sae: int | None = None
    """Clusters = latents (default 8 x d_model)."""
    max_iter: int = 20
    """Lloyd iterations."""
    seed: int = 0
    """Seed of the k-means++ initialisation."""


@dataclass(frozen=True)
class LocalPCAConfig:
    """k-means + local PCA: d_sae // k clusters, each with k - 1 principal components."""

    d_sae: int | None = None
    """Latents (default 8 x d_model)."""
    k: int = 16
    """L0: the cluster indicator plus k - 1 components."""
    assignment: Literal["centroid", "flat"] = "centroid"
    """Assign inputs to the nearest centroid, or to the nearest affine flat (k-flats)."""
    max_iter: int = 20
    """Lloyd iterations."""
    seed: int = 0
    """Seed of the k-means++ initialisation."""


class Trainer(NamedTuple):
    """One ``itda-lens train`` architecture: its config class and how it fits
    (``fit(cached, cfg, model_name, device)``; with ``warm_start`` it also takes
    ``init=`` / ``init_rule=``)."""

    config: type
    fit: Callable[..., SAE[Any]]
    help: str
    warm_start: bool = False


def _width(cfg: Any, cached: CachedActivations) -> int:
    return cfg.d_sae or 8 * cached.acts.shape[1]


def _sae_lens_trainer(arch: str) -> Trainer:
    def fit(
        cached: CachedActivations,
        cfg: SAETrainConfig,
        name: str | None,
        device: str,
        init: InitSource | None = None,
        init_rule: Rule = "auto",
    ) -> SAE[Any]:
        n = cached.acts.shape[0]
        width = cfg.d_sae or (
            init_rows(resolve_rule(arch, init_rule), init.n_atoms)
            if init is not None
            else _width(cfg, cached)
        )
        return train_sae(
            cached,
            architecture=arch,  # type: ignore[arg-type]
            d_sae=width,
            k=cfg.k,
            training_tokens=cfg.epochs * n,
            batch_size=min(cfg.batch_size, n),
            lr=cfg.lr,
            seed=cfg.seed,
            model_name=name,
            device=device,
            init=init,
            init_rule=init_rule,
        ).sae

    return Trainer(SAETrainConfig, fit, f"sae_lens {arch} SAE (its own trainer)", warm_start=True)


def _pam(cached: CachedActivations, cfg: PAMSettings, name: str | None, device: str) -> SAE[Any]:
    return train_pam(cached, cfg, model_name=name, device=device).sae


def _kmeans(
    cached: CachedActivations, cfg: KMeansConfig, name: str | None, device: str
) -> SAE[Any]:
    return fit_kmeans_sae(
        cached,
        _width(cfg, cached),
        max_iter=cfg.max_iter,
        seed=cfg.seed,
        model_name=name,
        device=device,
    )


def _local_pca(
    cached: CachedActivations, cfg: LocalPCAConfig, name: str | None, device: str
) -> SAE[Any]:
    width = _width(cfg, cached)
    if width // cfg.k < 1:
        raise ValueError(f"d_sae {width} is smaller than k {cfg.k}: no room for a cluster")
    return fit_local_pca_sae(
        cached,
        width // cfg.k,
        cfg.k - 1,
        assignment=cfg.assignment,
        max_iter=cfg.max_iter,
        seed=cfg.seed,
        model_name=name,
        device=device,
    )


#: ``itda-lens train ARCH``: the one dispatch table.
TRAINERS: dict[str, Trainer] = {
    **{arch: _sae_lens_trainer(arch) for arch in TRAIN_ARCHITECTURES},
    "pam": Trainer(PAMSettings, _pam, "PAM-SGD (exact decoder solve + Adam encoder steps)"),
    "kmeans": Trainer(KMeansConfig, _kmeans, "k-means autoencoder (SplInterp)"),
    "kmeans-pca": Trainer(LocalPCAConfig, _local_pca, "k-means + local PCA autoencoder"),
}


@dataclass
class InspectCommand:
    """Summarise a saved ITDA and show its atoms as tokens in context."""

    dir: str = field(positional=True)
    """A saved ITDA folder."""
    top: int = 10
    """How many atoms to show."""
    model: str | None = None
    """Override the model named in the ITDA's metadata."""
    data: str | None = None
    """Override the token data named in the ITDA's metadata."""
    usage_seqs: int = 32
    """Sequences encoded to rank atoms by use."""
    json: bool = False
    """Print the summary as JSON."""


@dataclass
class DashboardCommand:
    """Write a static dashboard (opens from disk) of a saved sae_lens SAE or ITDA folder."""

    dir: str = field(positional=True)
    """A folder written by save_model (any registered architecture, ITDA included)."""
    out: str | None = None
    """Output folder (default: DIR/dashboard)."""
    model: str | None = None
    """Override the model named in the SAE's metadata."""
    data: str = "kjv:heldout"
    """Held-out tokens the latents are read on: kjv:heldout | .pt/.npy token file | folder | hub."""
    split: str = "test"
    """Dataset split (hub and save_to_disk data)."""
    seqs: int = 256
    """Sequences of --data to read (of the SAE's context size)."""
    top_k: int = 10
    """Top-activating contexts kept per latent."""
    batch_size: int = 16
    """Sequences per forward pass."""
    device: str | None = None
    """Device for the model and the SAE (default: cuda when present, else cpu)."""
    overwrite: bool = False
    """Replace a non-empty output folder."""


@dataclass
class EvalCommand:
    """Evaluate a saved sae_lens SAE or ITDA folder on a zoo model (offline)."""

    dir: str = field(positional=True)
    """A folder written by save_model (any registered architecture, ITDA included)."""
    model: str | None = None
    """Zoo model (default: the SAE's metadata model_name)."""
    heldout_seqs: int = 96
    """Held-out windows for run_evals."""
    no_probe: bool = False
    """Skip k-sparse probing."""
    core: bool = False
    """Also run SAEBench's core eval."""
    out: str | None = None
    """JSON file (default: DIR/eval.json)."""


@dataclass
class SimilarityCommand:
    """Jaccard similarity of ITDA dictionaries: layer by layer for two builds, model-level for more."""

    dirs: list[str] = field(positional=True, nargs="+")
    """ITDA folders, or folders holding one ITDA per hook (a multi-hook build)."""
    out: str = "similarity.png"
    """Heatmap PNG."""


@dataclass
class DiffCommand:
    """Diff a base model and its fine-tune: ITDA dictionaries of both over the same tokens."""

    base: str = field(positional=True)
    """The base model (zoo name, model folder, TransformerLens name or hf:NAME_OR_DIR)."""
    ft: str = field(positional=True)
    """The fine-tune (same tokenizer and width as the base)."""
    hook: list[str] = field(default_factory=list, action="append", nargs=None, type=str)
    """Hook point (repeat for several; default every layer's hook_resid_post)."""
    data: str | None = None
    """Tokens both dictionaries are built and scored on (default: the fine-tune card's diff_data,
    else kjv:heldout) | .pt/.npy token file | save_to_disk folder | hub name."""
    split: str = "train"
    """Dataset split (hub and save_to_disk data)."""
    seqs: int = 512
    """Sequences of --data to read (fewer if it has fewer)."""
    out: str = "itda_diff"
    """Report folder: report.md, diff.json, plots, and both models' ITDAs under itdas/."""
    itdas: str | None = None
    """A previous diff's itdas/ folder: score with its dictionaries instead of building (same
    --data and --seqs)."""
    top: int = 10
    """Contexts and atoms listed per layer and side."""
    overwrite: bool = False
    """Replace a non-empty report folder."""


@dataclass
class DemoCommand:
    """The main job: build, evaluate and report on the default zoo model (offline)."""

    out: str = "itda_report"
    """Report folder."""
    overwrite: bool = False
    """Replace an existing report folder."""
    model: str | None = None
    """Zoo model (default kjv-4l128-s0)."""
    layers: list[int] = field(default_factory=lambda: [1, 2], nargs="+", type=int, required=False)
    """Layers whose resid_post is decomposed."""
    quick: bool = False
    """A smaller run (for tests)."""
