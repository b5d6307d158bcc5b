"""``itda-lens``: build, inspect, evaluate, compare and demo ITDA dictionaries, and train the
comparison SAEs (sae_lens TopK / BatchTopK, PAM-SGD, k-means, local PCA), from the command line.

Without ``--model`` every command uses the zoo's default model, and without ``--data`` the zoo corpus
(``kjv``), so everything runs offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.util import extract_layer_from_tlens_hook_name as hook_layer_of
from tqdm.auto import tqdm

from itda_lens import zoo
from itda_lens.activations import check_hook_names, collect_activations, token_batches
from itda_lens.analysis import atom_usage, in_context, replay_sequences
from itda_lens.builder import build_itda
from itda_lens.demo import DEMO_CONFIG, default_setup, run_demo
from itda_lens.evals import evaluate_all
from itda_lens.plots import heatmap
from itda_lens.probing import probe_data
from itda_lens.resolve import resolve_model, resolve_tokens
from itda_lens.saes import ITDA, check_sae_folder
from itda_lens.similarity import model_jaccard, similarity_matrix
from itda_lens.splinterp.kmeans import fit_kmeans_sae, fit_local_pca_sae
from itda_lens.splinterp.pam import PAMSettings, train_pam
from itda_lens.training import train_sae

MODEL_HELP = (
    "zoo model (default kjv-4l128-s0), model folder, or TransformerLens pretrained name (hub)"
)
DATA_HELP = "kjv (zoo corpus, default) | kjv:heldout | .pt/.npy token file | save_to_disk folder | hub dataset name"


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="build ITDA dictionaries at one or more hook points")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--hook",
        action="append",
        required=True,
        help="hook point, e.g. blocks.2.hook_resid_post (repeatable)",
    )
    p.add_argument("--data", "--dataset", dest="data", default=None, help=DATA_HELP)
    p.add_argument("--split", default="train", help="dataset split (hub and save_to_disk data)")
    p.add_argument("--k", type=int, default=40, help="pursuit steps (L0)")
    p.add_argument(
        "--cos-threshold",
        type=float,
        default=0.8,
        help="add an activation when cos(x, recon) is below this",
    )
    p.add_argument("--max-atoms", type=int, default=None)
    p.add_argument("--encoder", choices=["mp", "omp"], default="mp")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument(
        "--context-size",
        type=int,
        default=None,
        help="tokens per sequence (text data: default 128)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument(
        "--patience-tokens",
        type=int,
        default=None,
        help="stop once no atom was added for this many tokens",
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted build from OUT/checkpoint"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", required=True, help="output folder (one sub-folder per hook when several)"
    )


def _cmd_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    model = resolve_model(args.model, device=args.device)
    tokens, dataset_path = resolve_tokens(
        args.data, model, split=args.split, context_size=args.context_size
    )
    result = build_itda(
        model,
        tokens,
        args.hook,
        k=args.k,
        cos_threshold=args.cos_threshold,
        max_atoms=args.max_atoms,
        encoder=args.encoder,
        batch_size=args.batch_size,
        context_size=args.context_size,
        max_tokens=args.max_tokens,
        patience_tokens=args.patience_tokens,
        device=args.device,
        checkpoint_dir=out / "checkpoint",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        model_name=args.model or model.cfg.model_name,
        dataset_path=dataset_path,
    )
    itdas = {args.hook[0]: result} if isinstance(result, ITDA) else result
    folders = {hook: out if len(itdas) == 1 else out / hook for hook in itdas}
    for hook, itda in itdas.items():
        itda.save_model(folders[hook])
        print(f"saved ITDA at {hook}: {itda.cfg.d_sae} atoms (k={itda.cfg.k}) -> {folders[hook]}")
    print(f"next: itda-lens inspect {folders[args.hook[0]]}")
    return 0


TRAIN_ARCHS = (
    "topk",
    "batchtopk",
    "abstopk",
    "matching_pursuit",
    "pam",
    "pam-relu",
    "pam-abstopk",
    "kmeans",
    "kmeans-pca",
)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a comparison SAE (sae_lens TopK/BatchTopK, PAM-SGD, k-means, local PCA)",
    )
    p.add_argument("arch", choices=TRAIN_ARCHS)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--hook", required=True, help="hook point, e.g. blocks.2.hook_resid_post")
    p.add_argument("--data", "--dataset", dest="data", default=None, help=DATA_HELP)
    p.add_argument("--split", default="train", help="dataset split (hub and save_to_disk data)")
    p.add_argument("--context-size", type=int, default=None, help="tokens per sequence")
    p.add_argument(
        "--max-tokens", type=int, default=262_144, help="activations to cache and train on"
    )
    p.add_argument("--d-sae", type=int, default=None, help="latents (default 8 x d_model)")
    p.add_argument("--k", type=int, default=16, help="L0 (TopK k; local PCA uses k - 1 components)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the cached activations")
    p.add_argument("--batch-size", type=int, default=256, help="activations per SGD step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder (a sae_lens SAE folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
    if args.k < 1 or args.epochs < 1 or args.max_tokens < 1:
        raise SystemExit("--k, --epochs and --max-tokens must be >= 1")
    model = resolve_model(args.model, device=args.device)
    check_hook_names(model, [args.hook])
    tokens, _ = resolve_tokens(args.data, model, split=args.split, context_size=args.context_size)
    cached = collect_activations(
        model, tokens, args.hook, context_size=args.context_size, max_tokens=args.max_tokens
    )
    n = cached.acts.shape[0]
    d_sae = args.d_sae or 8 * cached.acts.shape[1]
    name = args.model or model.cfg.model_name
    print(f"cached {n:,} activations at {args.hook}; training {args.arch} with {d_sae} latents")
    sae: Any
    if args.arch in ("topk", "batchtopk", "abstopk", "matching_pursuit"):
        sae = train_sae(
            cached,
            architecture=args.arch,
            d_sae=d_sae,
            k=args.k,
            training_tokens=args.epochs * n,
            batch_size=min(args.batch_size, n),
            model_name=name,
            device=args.device,
        ).sae
    elif args.arch in ("pam", "pam-relu", "pam-abstopk"):
        activations = {"pam": "topk", "pam-relu": "relu", "pam-abstopk": "abstopk"}
        settings = PAMSettings(
            d_sae=d_sae,
            k=args.k,
            epochs=args.epochs,
            batch_size=min(args.batch_size, n),
            activation=activations[args.arch],  # type: ignore[arg-type]
        )
        sae = train_pam(cached, settings, model_name=name, device=args.device).sae
    elif args.arch == "kmeans":
        sae = fit_kmeans_sae(cached, d_sae, model_name=name, device=args.device)
    else:
        clusters = d_sae // args.k
        if clusters < 1:
            raise SystemExit(f"--d-sae {d_sae} is smaller than --k {args.k}: no room for a cluster")
        sae = fit_local_pca_sae(cached, clusters, args.k - 1, model_name=name, device=args.device)
    sae.save_model(out)
    print(f"saved {type(sae).__name__} ({sae.cfg.d_sae} latents) -> {out}")
    print(f"next: itda-lens eval {out}")
    return 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="summarise a saved ITDA and show its atoms as tokens in context"
    )
    p.add_argument("dir")
    p.add_argument("--top", type=int, default=10, help="how many atoms to show")
    p.add_argument("--model", default=None, help="override the model named in the ITDA's metadata")
    p.add_argument(
        "--data", default=None, help="override the token data named in the ITDA's metadata"
    )
    p.add_argument(
        "--usage-seqs", type=int, default=32, help="sequences encoded to rank atoms by use"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _summary(itda: ITDA, folder: str) -> dict[str, Any]:
    meta = itda.cfg.metadata
    return {
        "folder": folder,
        "n_atoms": itda.cfg.d_sae,
        "d_in": itda.cfg.d_in,
        "k": itda.cfg.k,
        "encoder": itda.cfg.encoder,
        "hook_name": meta.hook_name,
        "model_name": meta.model_name,
        "context_size": meta.context_size,
        "dataset_path": meta.dataset_path,
        "builder": {k: v for k, v in (meta.get("itda_builder") or {}).items() if k != "growth"},
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    itda = ITDA.load_from_disk(args.dir)
    summary = _summary(itda, args.dir)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:>13}: {value}")
    meta = itda.cfg.metadata
    model = tokens = None
    try:
        model = resolve_model(args.model or meta.model_name)
        data_spec = args.data or meta.dataset_path
        tokens = (
            resolve_tokens(data_spec, model, context_size=meta.context_size)[0]
            if data_spec
            else None
        )
    except Exception as err:  # the atoms can still be listed without model or data
        print(f"(cannot load model/data for context: {err}; pass --model / --data)")
    tokenizer = getattr(model, "tokenizer", None)
    atoms = list(range(min(args.top, itda.cfg.d_sae)))
    counts = None
    if model is not None and tokens is not None:
        sample = next(
            token_batches(
                tokens, args.usage_seqs, context_size=meta.context_size, tokenizer=tokenizer
            )
        )
        usage = atom_usage(itda, model, sample)
        counts = usage.counts
        atoms = torch.argsort(counts, descending=True, stable=True)[: args.top].tolist()
        print(
            f"\ntop {len(atoms)} atoms by use on {usage.n_tokens} tokens of {args.data or meta.dataset_path}:"
        )
    else:
        print(f"\nfirst {len(atoms)} atoms (give --model and --data to rank by use):")
    wanted = {int(itda.atom_labels[a, 0]) for a in atoms}
    seqs = (
        replay_sequences(tokens, wanted, context_size=meta.context_size, tokenizer=tokenizer)
        if tokens is not None
        else {}
    )
    for a in atoms:
        seq, pos = itda.atom_labels[a].tolist()
        tid = int(itda.atom_token_ids[a])
        token = repr(tokenizer.decode([tid])) if tokenizer is not None and tid >= 0 else str(tid)
        used = f" used {int(counts[a])}x" if counts is not None else ""
        ctx = (
            f"  {in_context(tokenizer, seqs[seq], pos)}"
            if tokenizer is not None and seq in seqs
            else ""
        )
        print(f"  atom {a:>6} (seq {seq}, pos {pos}) token {token}{used}{ctx}")
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a saved sae_lens SAE or ITDA folder on a zoo model (offline)"
    )
    p.add_argument(
        "dir", help="a folder written by save_model (any registered architecture, ITDA included)"
    )
    p.add_argument(
        "--model", default=None, help="zoo model (default: the SAE's metadata model_name)"
    )
    p.add_argument("--heldout-seqs", type=int, default=96, help="held-out windows for run_evals")
    p.add_argument("--no-probe", action="store_true", help="skip k-sparse probing")
    p.add_argument("--core", action="store_true", help="also run SAEBench's core eval")
    p.add_argument("--out", default=None, help="JSON file (default: DIR/eval.json)")


def _cmd_eval(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    cfg = check_sae_folder(folder)
    sae = (
        ITDA.load_from_disk(folder)
        if cfg.get("architecture") == "itda"
        else SAE.load_from_disk(folder)
    )
    name = args.model or sae.cfg.metadata.model_name
    if name not in zoo.list_models(include_checkpoints=True):
        raise ValueError(
            f"{folder}'s model {name!r} is not a zoo model; pass --model (one of {zoo.list_models()})"
        )
    tokenizer = zoo.model_card(name)["tokenizer"]
    stages = tqdm(total=2 + (not args.no_probe) + args.core, desc="itda-lens eval", unit="stage")
    model = zoo.load_model(name)
    heldout = zoo.load_tokens(
        "heldout", args.heldout_seqs, sae.cfg.metadata.context_size or 128, tokenizer=tokenizer
    )
    probe = None if args.no_probe else probe_data(tokenizer=tokenizer)
    stages.update()
    result = evaluate_all(sae, model, heldout, probe=probe, core=args.core)
    stages.update(stages.total - stages.n)
    stages.close()
    result = {
        "sae": str(folder),
        "architecture": cfg.get("architecture"),
        "model": name,
        "d_sae": sae.cfg.d_sae,
        "heldout_tokens": heldout.numel(),
        **result,
    }
    out = Path(args.out) if args.out else folder / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    ev = result["run_evals"]
    print(
        f"CE-loss score {ev['ce_loss_score']:.3f}, KL score {ev['kl_div_score']:.3f}, "
        f"explained variance {ev['explained_variance']:.3f}, L0 {ev['l0']:.1f}"
    )
    if probe is not None:
        print(
            "probing (mean over tasks): "
            + ", ".join(f"k={k}: {v:.3f}" for k, v in result["probing"]["mean"].items())
        )
    print(f"wrote {out}")
    return 0


def _add_similarity(sub: Any) -> None:
    p = sub.add_parser(
        "similarity", help="Jaccard similarity of ITDA dictionaries (layers and models)"
    )
    p.add_argument(
        "dirs",
        nargs="+",
        help="ITDA folders, or folders holding one ITDA per hook (a multi-hook build)",
    )
    p.add_argument("--out", default="similarity.png", help="heatmap PNG")


def _load_dictionaries(folder: Path) -> dict[str, ITDA]:
    """One ITDA folder, or a folder of per-hook ITDA folders, as {hook: ITDA} in layer order."""
    if (folder / "cfg.json").is_file():
        itda = ITDA.load_from_disk(folder)
        return {itda.cfg.metadata.hook_name or folder.name: itda}
    subs = (
        sorted(
            (p for p in folder.iterdir() if (p / "cfg.json").is_file()),
            key=lambda p: (hook_layer_of(p.name) or 0, p.name),
        )
        if folder.is_dir()
        else []
    )
    if not subs:
        raise FileNotFoundError(f"{folder} holds no ITDA (no cfg.json in it or in its sub-folders)")
    return {p.name: ITDA.load_from_disk(p) for p in subs}


def _cmd_similarity(args: argparse.Namespace) -> int:
    # a list, not a dict: the same folder given twice is a legitimate self-comparison
    if len(args.dirs) < 2:
        raise SystemExit("itda-lens similarity: give at least two ITDA folders to compare")
    models = [(d, _load_dictionaries(Path(d))) for d in args.dirs]
    if len(models) == 2:
        (name_a, a), (name_b, b) = models
        matrix = similarity_matrix(list(a.values()), list(b.values()))
        rows, cols, title = list(a), list(b), f"ITDA Jaccard: {name_a} vs {name_b}"
    else:
        matrix = torch.tensor(
            [
                [model_jaccard(list(x.values()), list(y.values())) for _, y in models]
                for _, x in models
            ]
        )
        rows = cols = [name for name, _ in models]
        title = "model-level ITDA Jaccard (union over layers)"
    width = max(len(c) for c in cols) + 2
    print(" " * (max(len(r) for r in rows) + 2) + "".join(f"{c:>{width}}" for c in cols))
    for r, values in zip(rows, matrix.tolist(), strict=True):
        print(f"{r:<{max(len(x) for x in rows) + 2}}" + "".join(f"{v:>{width}.3f}" for v in values))
    heatmap(matrix.tolist(), args.out, rows=rows, cols=cols, title=title)
    print(f"heatmap saved to {args.out}")
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the main job: build, evaluate and report on the default zoo model (offline)"
    )
    p.add_argument("--out", default="itda_report", help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--model", default=None, help="zoo model (default kjv-4l128-s0)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--k", type=int, default=DEMO_CONFIG.k)
    p.add_argument("--target-atoms", type=int, default=DEMO_CONFIG.target_atoms)
    p.add_argument("--quick", action="store_true", help="a smaller run (for tests)")


def _cmd_demo(args: argparse.Namespace) -> int:
    sizes = {"n_train": 96, "n_heldout": 32} if args.quick else {}
    setup = default_setup(args.model, **sizes)
    target = min(args.target_atoms, 256) if args.quick else args.target_atoms
    out = run_demo(
        args.out,
        setup,
        layers=args.layers,
        cfg=DEMO_CONFIG.replace(k=args.k, target_atoms=target),
        overwrite=args.overwrite,
    )
    print(f"report written to {out / 'report.md'} (plots and saved ITDAs alongside)")
    print(f"next: itda-lens inspect {out / 'itdas' / f'blocks.{args.layers[0]}.hook_resid_post'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itda-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_inspect(sub)
    _add_eval(sub)
    _add_train(sub)
    _add_similarity(sub)
    _add_demo(sub)
    return parser


COMMANDS = {
    "build": _cmd_build,
    "inspect": _cmd_inspect,
    "eval": _cmd_eval,
    "train": _cmd_train,
    "similarity": _cmd_similarity,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        FileExistsError,
    ) as err:  # incl. IncompatibleLabels
        print(f"itda-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
