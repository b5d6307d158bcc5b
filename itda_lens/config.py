"""The typed configs of every command-line job; ``itda_lens.cli`` is generated from them.

A job is a command dataclass (what it reads and writes) plus, where it has one, the library config
of the work itself, which lives with the code that runs it: ``build`` takes a
:class:`~itda_lens.builder.BuildConfig`, each ``train`` architecture its fitter's config (the table
is :data:`itda_lens.trainers.TRAINERS`). Every field has a one-line doc (it is the flag's help), so
a flag cannot exist without reaching the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from simple_parsing import field

from itda_lens.saes.itda_transcoder import Judge
from itda_lens.similarity import LayerMeasure
from itda_lens.warmstart import Rule

MODEL_HELP = (
    "zoo model (default kjv-4l128-s0), model folder, TransformerLens pretrained name, or "
    "hf:NAME_OR_DIR (a Hugging Face causal LM; --hook takes module paths, e.g. transformer.h.1)"
)
DATA_HELP = "kjv (zoo corpus) | kjv:heldout | kjv:SPLIT:VARIANT | .pt/.npy token file | save_to_disk folder | hub name"


@dataclass
class BuildCommand:
    """Build ITDA dictionaries at one or more hook points (one forward pass for all), or an ITDA
    transcoder from one hook to another (--hook-out)."""

    hook: list[str] = field(default_factory=list, action="append", nargs=None, type=str)
    """Hook point, e.g. blocks.2.hook_resid_post (repeat the flag for several)."""
    out: str = field(default=None, required=True)
    """Output folder (one sub-folder per hook when several)."""
    hook_out: str | None = None
    """Build an ITDA transcoder from the one --hook to this hook, e.g. --hook blocks.1.ln2.hook_normalized --hook-out blocks.1.hook_mlp_out."""
    judge: Judge = "output"
    """With --hook-out: judge each token's reconstruction on its output or on its input (the ITDA's rule)."""
    skip_connection: bool = False
    """With --hook-out: fit a linear skip term on the first --target-sample-tokens tokens; the pairs hold what it leaves."""
    refit_decoder: bool = False
    """With --hook-out: refit the output atoms by least squares on that sample's codes."""
    model: str | None = None
    """Zoo model (default kjv-4l128-s0), model folder, TransformerLens pretrained name, or
    hf:NAME_OR_DIR (a Hugging Face causal LM; --hook takes its module paths)."""
    data: str | None = field(default=None, alias=["--dataset"])
    """kjv (zoo corpus, default) | kjv:heldout | kjv:SPLIT:planted|epistles (variants) | .pt/.npy token file | save_to_disk folder | hub name."""
    split: str = "train"
    """Dataset split (hub and save_to_disk data)."""
    resume: bool = False
    """Continue an interrupted build from OUT/checkpoint."""
    max_cpu_memory: str | None = None
    """hf: models larger than memory: load with accelerate (device_map=auto) keeping at most this much on the CPU, e.g. 8GiB; the rest goes to --offload-folder."""
    offload_folder: str | None = None
    """Where accelerate offloads what does not fit --max-cpu-memory (hf: models)."""


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


@dataclass
class InspectCommand:
    """Summarise a saved ITDA or ITDA transcoder and show its atoms as tokens in context (and, for
    a transcoder, the tokens each output atom promotes)."""

    dir: str = field(positional=True)
    """A saved ITDA or ITDA transcoder folder."""
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
    """Similarity of ITDA dictionaries: layer by layer for two builds, model-level for more."""

    dirs: list[str] = field(positional=True, nargs="+")
    """ITDA folders, or folders holding one ITDA per hook (a multi-hook build)."""
    measure: LayerMeasure = "jaccard"
    """jaccard (atom labels; fast, path-dependent) | transfer (the ITDA measure for layer matching) | support | mutual-knn | cknna | debiased-cka | procrustes; all but jaccard read both models (two builds only)."""
    models: list[str] = field(default_factory=list, nargs="*")
    """The two builds' models (default: each build's metadata model_name)."""
    data: str | None = None
    """Tokens the builds read, for transfer (default: their metadata dataset_path): kjv | .pt/.npy token file | folder | hub."""
    probe_data: str = "kjv:heldout"
    """Tokens the models are compared on (not the builds' own): kjv:heldout | .pt/.npy token file | folder | hub."""
    probe_tokens: int = 2048
    """Probe tokens drawn from --probe-data."""
    k: int = 10
    """Neighbours for mutual-knn and cknna."""
    out: str = "similarity.png"
    """Heatmap PNG."""


@dataclass
class ImportReferenceCommand:
    """Read a dictionary saved by the reference code (atoms.pt, atom_indices.pt, metadata.yaml)
    into an ITDA folder."""

    dir: str = field(positional=True)
    """The reference's folder of three files."""
    out: str = "itda_reference"
    """The ITDA folder to write (sae_lens format)."""
    tokens: str | None = None
    """The token stream the reference read, as a .pt/.npy [sequences, seq_len] file: fills in the atoms' tokens."""
    hook: str | None = None
    """Hook name to record (default: blocks.{layer}.hook_resid_post, the reference's)."""
    overwrite: bool = False
    """Replace a non-empty --out folder."""


@dataclass
class ExportReferenceCommand:
    """Write a saved ITDA as the reference code's three files."""

    dir: str = field(positional=True)
    """A saved ITDA folder."""
    out: str = "itda_reference_files"
    """The folder for atoms.pt, atom_indices.pt and metadata.yaml."""
    loss_threshold: float | None = None
    """The reference's tau, for an ITDA that records no threshold (default: from its build record)."""
    overwrite: bool = False
    """Replace a non-empty --out folder."""


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
