"""``itda-lens``: build, inspect, evaluate, compare and demo ITDA dictionaries, and train the
comparison SAEs, from the command line.

Every subcommand is generated from the typed configs in :mod:`itda_lens.config` (and ``build`` from
:class:`~itda_lens.builder.BuildConfig`), so each flag is a config field. Without ``--model`` every
command uses the zoo's default model, and without ``--data`` the zoo corpus (``kjv``), so
everything runs offline.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.transcoder import Transcoder
from simple_parsing import ArgumentParser, DashVariant
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule

from itda_lens import zoo
from itda_lens.activations import check_hook_names, collect_activations, token_batches
from itda_lens.analysis import atom_usage, in_context, replay_sequences
from itda_lens.budget import DEFAULT_FRACTION, ENV_VAR, default_device, set_memory_budget
from itda_lens.builder import BuildConfig, build_itda, build_itda_transcoder
from itda_lens.builder.checkpoint import keep_build_lock
from itda_lens.builder.distributed import Comm
from itda_lens.config import (
    BuildCommand,
    DashboardCommand,
    DemoCommand,
    DiffCommand,
    EvalCommand,
    ExportReferenceCommand,
    ImportReferenceCommand,
    InspectCommand,
    SimilarityCommand,
    TrainCommand,
)
from itda_lens.dashboard import logit_effects, write_dashboard
from itda_lens.demo import DEMO_CONFIG, default_setup, run_demo
from itda_lens.diff_report import write_diff_report
from itda_lens.diffing import DIFF_CONFIG, DIRECTIONS, diff_dictionaries, diff_models
from itda_lens.evals import evaluate_all
from itda_lens.plots import heatmap
from itda_lens.probing import probe_data
from itda_lens.resolve import (
    build_stream,
    model_card,
    output_folder,
    resolve_model,
    resolve_tokens,
)
from itda_lens.saes import ITDA, ITDABase, ITDATranscoder, check_sae_folder, load_itdas
from itda_lens.similarity import compare_layers, model_jaccard
from itda_lens.trainers import TRAINERS
from itda_lens.warmstart import as_source

#: errors that are about the user's input, printed as one line with exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
#: the folders ``inspect`` reads (dictionaries whose atoms were read at tokens), by architecture
INSPECTABLE: dict[str, type[ITDA] | type[ITDATranscoder]] = {
    "itda": ITDA,
    "itda_transcoder": ITDATranscoder,
}


def plain(doc: str | None) -> str:
    """A docstring as terminal text: reST roles (``:mod:`x```, ``:class:`~a.B``` -> ``B``) and
    double backquotes removed."""

    def role(m: re.Match[str]) -> str:
        target = m.group(2)
        return target.rsplit(".", 1)[-1] if m.group(1) else target

    return re.sub(r":[a-z]+:`(~?)([^`]+)`", role, doc or "").replace("``", "")


def _parser(sub: Any, name: str, help: str) -> ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        add_option_string_dash_variants=DashVariant.DASH,
        add_config_path_arg=False,
    )


def _cmd_build(args: Any) -> int:
    cmd: BuildCommand = args.cmd
    cfg: BuildConfig = args.build
    if cmd.hook_out is not None:
        return _build_transcoder(cmd, cfg)
    given = [
        f
        for f, on in (
            ("--judge", cmd.judge != "output"),
            ("--skip-connection", cmd.skip_connection),
            ("--refit-decoder", cmd.refit_decoder),
        )
        if on
    ]
    if given:
        raise ValueError(f"{', '.join(given)} is for ITDA transcoders: give --hook-out too")
    if not cmd.hook:
        raise ValueError("give at least one --hook, e.g. --hook blocks.2.hook_resid_post")
    out = Path(cmd.out)
    comm = Comm.current()
    if comm is not None and comm.rank != 0:  # a data-parallel build: rank 0 writes for all
        return _build_into(cmd, cfg, out, save=False)
    # one build per --out: the lock build_itda takes on the checkpoint folder is kept until the
    # ITDAs are saved
    with keep_build_lock(out / "checkpoint"):
        return _build_into(cmd, cfg, out)


def _build_inputs(cmd: BuildCommand, cfg: BuildConfig) -> tuple[Any, Any, str]:
    """The model and token stream a build reads, and the stream's name for the metadata."""
    model = resolve_model(
        cmd.model,
        device=cfg.device or default_device(),
        max_cpu_memory=cmd.max_cpu_memory,
        offload_folder=cmd.offload_folder,
    )
    tokens, dataset_path = resolve_tokens(
        cmd.data, model, split=cmd.split, context_size=cfg.context_size
    )
    return model, tokens, dataset_path


def _build_transcoder(cmd: BuildCommand, cfg: BuildConfig) -> int:
    """``build --hook-out``: an ITDA transcoder from the one ``--hook`` to ``--hook-out``."""
    if len(cmd.hook) != 1:
        raise ValueError(
            "--hook-out builds a transcoder from exactly one --hook (its input, e.g. "
            f"blocks.1.ln2.hook_normalized); got {len(cmd.hook)}"
        )
    if cmd.resume:
        raise ValueError(
            "--resume continues an ITDA build from its checkpoint; the transcoder build keeps "
            "none (bound it with --max-tokens or --max-atoms)"
        )
    if Comm.current() is not None:
        raise ValueError("the transcoder build is not data-parallel: run it without torchrun")
    model, tokens, dataset_path = _build_inputs(cmd, cfg)
    hook = cmd.hook[0]
    transcoder = build_itda_transcoder(
        model,
        tokens,
        hook,
        cmd.hook_out,
        cfg,
        judge=cmd.judge,
        skip_connection=cmd.skip_connection,
        refit_decoder=cmd.refit_decoder,
        model_name=cmd.model or model.cfg.model_name,
        dataset_path=dataset_path,
    )
    out = Path(cmd.out)
    transcoder.save_model(out)
    rec = transcoder.build_record
    assert rec is not None  # a build records itself
    print(
        f"saved ITDA transcoder {hook} -> {cmd.hook_out}: {transcoder.cfg.d_sae} atoms "
        f"(k={transcoder.cfg.k}, judged on the {rec.judge}, threshold {rec.cos_threshold:.4f}, "
        f"{rec.tokens_seen:,} tokens read{', skip term' if rec.skip_connection else ''}"
        f"{', decoder refitted' if rec.decoder == 'lstsq' else ''}) -> {out}"
    )
    print(f"next: itda-lens inspect {out}")
    return 0


def _build_into(cmd: BuildCommand, cfg: BuildConfig, out: Path, save: bool = True) -> int:
    model, tokens, dataset_path = _build_inputs(cmd, cfg)
    result = build_itda(
        model,
        tokens,
        cmd.hook,
        cfg,
        checkpoint_dir=out / "checkpoint",
        resume=cmd.resume,
        model_name=cmd.model or model.cfg.model_name,
        dataset_path=dataset_path,
    )
    itdas = result
    if not save:
        return 0
    folders = {hook: out if len(itdas) == 1 else out / hook for hook in itdas}
    for hook, itda in itdas.items():
        itda.save_model(folders[hook])
        rec = itda.require_build_record()
        print(
            f"saved ITDA at {hook}: {itda.cfg.d_sae} atoms (k={itda.cfg.k}, threshold "
            f"{rec.cos_threshold:.4f}, {rec.tokens_seen:,} tokens read) -> {folders[hook]}"
        )
    print(f"next: itda-lens inspect {folders[cmd.hook[0]]}")
    return 0


def _cmd_train(args: Any) -> int:
    cmd: TrainCommand = args.cmd
    out = output_folder(cmd.out, cmd.overwrite)
    if cmd.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    trainer = TRAINERS[args.arch]
    warm: dict[str, Any] = {}
    if cmd.init_from is not None:
        if not trainer.warm_start:
            starts = ", ".join(a for a, t in TRAINERS.items() if t.warm_start)
            raise ValueError(
                f"--init-from starts a sae_lens SAE ({starts}); {args.arch} has its own initialisation"
            )
        warm = {"init": as_source(cmd.init_from), "init_rule": cmd.init_rule}
    elif cmd.init_rule != "auto":
        raise ValueError("--init-rule needs --init-from (an ITDA folder)")
    device = cmd.device or default_device()
    model = resolve_model(cmd.model, device=device)
    check_hook_names(model, [cmd.hook])
    tokens, _ = resolve_tokens(cmd.data, model, split=cmd.split, context_size=cmd.context_size)
    cached = collect_activations(
        model, tokens, cmd.hook, context_size=cmd.context_size, max_tokens=cmd.max_tokens
    )
    print(f"cached {cached.acts.shape[0]:,} activations at {cmd.hook}; training {args.arch}")
    sae = trainer.fit(
        cached, args.train, model_name=cmd.model or model.cfg.model_name, device=device, **warm
    )
    sae.save_model(out)
    init = sae.cfg.metadata.get("init")
    started = f", started from {init['from']} by {init['rule']!r}" if init else ""
    print(f"saved {type(sae).__name__} ({sae.cfg.d_sae} latents{started}) -> {out}")
    print(f"next: itda-lens eval {out}")
    return 0


def _build_summary(itda: ITDA | ITDATranscoder) -> dict[str, Any]:
    """The build record without its growth curve (None for a dictionary that was not built)."""
    record = itda.build_record
    if record is None:
        return {}
    return {k: v for k, v in record.to_dict().items() if k != "growth"}


def _summary(itda: ITDA | ITDATranscoder, folder: str) -> dict[str, Any]:
    meta = itda.cfg.metadata
    transcoder = (
        {"d_out": itda.cfg.d_out, "hook_name_out": meta.hook_name_out}
        if isinstance(itda, ITDATranscoder)
        else {}
    )
    return {
        "folder": folder,
        "architecture": itda.cfg.architecture(),
        "n_atoms": itda.cfg.d_sae,
        "d_in": itda.cfg.d_in,
        "k": itda.cfg.k,
        "encoder": itda.cfg.encoder,
        "hook_name": meta.hook_name,
        **transcoder,
        "model_name": meta.model_name,
        "context_size": meta.context_size,
        "dataset_path": meta.dataset_path,
        "builder": _build_summary(itda),
    }


def _load_inspectable(folder: str) -> ITDA | ITDATranscoder:
    """An ITDA or ITDA transcoder folder, loaded by its own class (which checks it); any other
    SAE is refused with what to use instead."""

    def check(cfg: dict[str, Any]) -> None:
        if cfg["architecture"] not in INSPECTABLE:
            raise ValueError(
                f"{folder} holds a {cfg['architecture']!r} SAE, whose latents were not read at "
                f"tokens: inspect reads ITDA and ITDA transcoder folders (for any SAE: itda-lens "
                f"dashboard {folder})"
            )

    cfg = check_sae_folder(folder, check_cfg=check)
    return INSPECTABLE[cfg["architecture"]].load_from_disk(folder)


def _token_text(tokenizer: Any, token_id: int) -> str:
    """A token id as its quoted text (the id itself without a tokenizer, or when unknown)."""
    return (
        repr(tokenizer.decode([token_id]))
        if tokenizer is not None and token_id >= 0
        else str(token_id)
    )


def _cmd_inspect(args: Any) -> int:
    args = args.cmd
    itda = _load_inspectable(args.dir)
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
        tokens = build_stream(itda, model, args.data)
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
    promoted = None
    if isinstance(itda, ITDATranscoder) and model is not None:
        effects = logit_effects(itda, model, n=5, latents=atoms)
        if effects is None:
            print(
                f"(no promoted tokens: {meta.hook_name_out} is not written to the residual stream)"
            )
        else:
            promoted = effects[0].tolist()
    for i, a in enumerate(atoms):
        seq, pos = itda.atom_labels[a].tolist()
        token = _token_text(tokenizer, int(itda.atom_token_ids[a]))
        used = f" used {int(counts[a])}x" if counts is not None else ""
        ctx = (
            f"  {in_context(tokenizer, seqs[seq], pos)}"
            if tokenizer is not None and seq in seqs
            else ""
        )
        print(f"  atom {a:>6} (seq {seq}, pos {pos}) token {token}{used}{ctx}")
        if promoted is not None:
            up = " ".join(_token_text(tokenizer, t) for t in promoted[i])
            print(f"{'':>10}output promotes {up}")
    print(f"\nnext: itda-lens dashboard {args.dir}  (every atom in the browser)")
    return 0


def _load_sae(folder: Path, device: str = "cpu") -> SAE[Any]:
    """Any saved SAE folder: an ITDA or ITDA transcoder by its own class (which checks the folder
    byte for byte, with clear errors), any other by sae_lens."""
    cfg = check_sae_folder(folder)
    cls = INSPECTABLE.get(cfg.get("architecture", ""))
    if cls is not None:
        return cls.load_from_disk(folder, device=device)
    return SAE.load_from_disk(folder, device=device)


def _cmd_dashboard(args: Any) -> int:
    cmd = args.cmd
    folder = Path(cmd.dir)
    device = cmd.device or default_device()
    sae = _load_sae(folder, device)
    meta = sae.cfg.metadata
    name = cmd.model or meta.model_name
    if name is None:
        raise ValueError(f"{folder} names no model in its metadata; pass --model")
    model = resolve_model(name, device=device)
    if not isinstance(model, HookedRootModule):
        raise ValueError(
            f"dashboards read hook points of a TransformerLens model; {name!r} is not one"
        )
    context = meta.context_size or 128
    source, data_name = resolve_tokens(cmd.data, model, split=cmd.split, context_size=context)
    tokenizer = getattr(model, "tokenizer", None)
    tokens = next(token_batches(source, cmd.seqs, context_size=context, tokenizer=tokenizer))
    provenance = None
    if isinstance(sae, ITDABase):  # an ITDA or ITDA transcoder: atoms read at tokens
        try:
            provenance = build_stream(sae, model)
        except Exception as err:  # the dashboard still works, without the atoms' own passages
            print(f"(build stream {meta.dataset_path!r} unavailable, no provenance: {err})")
    out = Path(cmd.out) if cmd.out else folder / "dashboard"
    index = write_dashboard(
        sae,
        model,
        tokens,
        out,
        provenance_tokens=provenance,
        data_name=data_name,
        top_k=cmd.top_k,
        batch_size=cmd.batch_size,
        overwrite=cmd.overwrite,
    )
    sides = (
        f" read at {meta.hook_name}, output atoms at {meta.hook_name_out}"
        if isinstance(sae, Transcoder)
        else ""
    )
    print(f"wrote {index} ({sae.cfg.d_sae:,} latents{sides} over {tokens.numel():,} tokens)")
    print(f"next: open file://{index.resolve()} in a browser (no server needed)")
    return 0


def _cmd_eval(args: Any) -> int:
    """sae_lens ``run_evals`` (+ probing, + SAEBench core) of an SAE folder; a transcoder folder
    gets ``transcoder_scores`` (the transcoder spliced in between its two hooks) instead."""
    args = args.cmd
    folder = Path(args.dir)
    sae = _load_sae(folder)
    meta = sae.cfg.metadata
    transcoder = isinstance(sae, Transcoder)
    if transcoder and args.core:
        raise ValueError(
            f"--core runs SAEBench's core eval, which scores an SAE's reconstruction of the hook "
            f"it reads; {folder} holds a transcoder ({meta.hook_name} -> {meta.hook_name_out}), "
            "scored spliced into its model: run itda-lens eval without --core"
        )
    name = args.model or meta.model_name
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
    hooks = {"hook_name": meta.hook_name, "hook_name_out": meta.hook_name_out} if transcoder else {}
    result = {
        "sae": str(folder),
        "architecture": sae.cfg.architecture(),
        "model": name,
        "d_sae": sae.cfg.d_sae,
        **hooks,
        "heldout_tokens": heldout.numel(),
        **result,
    }
    out = Path(args.out) if args.out else folder / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    if transcoder:
        _print_transcoder_scores(result["transcoder_scores"], meta)
    else:
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


def _print_transcoder_scores(ts: dict[str, float], meta: Any) -> None:
    print(
        f"transcoder {meta.hook_name} -> {meta.hook_name_out} spliced in, on "
        f"{int(ts['n_tokens']):,} scored tokens:"
    )
    print(
        f"  CE loss clean {ts['ce_loss_without_sae']:.4f}, spliced {ts['ce_loss_with_sae']:.4f}, "
        f"zero-ablated {ts['ce_loss_with_ablation']:.4f}, "
        f"with error term {ts['ce_loss_with_error_term']:.4f}"
    )
    print(
        f"  CE loss recovered {ts['ce_loss_score']:.3f}, output FVU {ts['fvu']:.3f}, "
        f"L0 {ts['l0']:.1f}, dead latents {ts['dead_fraction']:.1%}"
    )


def _leading_sequences(data: Any, model: Any, n_seq: int, context_size: int | None) -> torch.Tensor:
    """The first ``n_seq`` sequences of any token input (its first batch of that size)."""
    tokenizer = getattr(model, "tokenizer", None)
    batch = next(token_batches(data, n_seq, context_size=context_size, tokenizer=tokenizer), None)
    if batch is None:
        raise ValueError("the data holds no tokens")
    return batch


def _cmd_similarity(args: Any) -> int:
    cmd: SimilarityCommand = args.cmd
    # a list, not a dict: the same folder given twice is a legitimate self-comparison
    if len(cmd.dirs) < 2:
        raise ValueError("give at least two ITDA folders to compare")
    builds = [(d, load_itdas(Path(d))) for d in cmd.dirs]
    if len(builds) > 2 and cmd.measure != "jaccard":
        raise ValueError(
            f"--measure {cmd.measure} compares two builds layer by layer; for more builds only "
            "the model-level jaccard is available"
        )
    if len(builds) == 2:
        (name_a, a), (name_b, b) = builds
        extra: dict[str, Any] = {}
        if cmd.measure != "jaccard":
            specs = cmd.models or [next(iter(x.values())).cfg.metadata.model_name for x in (a, b)]
            if len(specs) != 2 or None in specs:
                raise ValueError(
                    f"--measure {cmd.measure} reads both models: pass --models A B (the builds "
                    "do not both name their model)"
                )
            model_a, model_b = (resolve_model(str(m)) for m in specs)
            first = next(iter(a.values()))
            ctx = first.cfg.metadata.context_size or None
            probe_data, _ = resolve_tokens(cmd.probe_data, model_a, split="test")
            n_probe_seq = math.ceil(2 * cmd.probe_tokens / (ctx or 128)) + 1
            extra = {
                "model_a": model_a,
                "model_b": model_b,
                "probe_tokens": _leading_sequences(probe_data, model_a, n_probe_seq, ctx),
                "n_probe": cmd.probe_tokens,
                "k": cmd.k,
            }
            if cmd.measure == "transfer":
                stream = build_stream(first, model_a, cmd.data)
                record = first.build_record
                if stream is None or record is None or record.stream.n_sequences is None:
                    raise ValueError(
                        "--measure transfer reads the models at the atoms' tokens: pass --data, "
                        "the tokens the builds read (their metadata names none)"
                    )
                n_seq = record.stream.n_sequences
                extra["tokens"] = _leading_sequences(stream, model_a, n_seq, ctx)
        matrix = compare_layers(list(a.values()), list(b.values()), cmd.measure, **extra)
        rows, cols, title = list(a), list(b), f"ITDA {cmd.measure}: {name_a} vs {name_b}"
    else:
        matrix = torch.tensor(
            [
                [model_jaccard(list(x.values()), list(y.values())) for _, y in builds]
                for _, x in builds
            ]
        )
        rows = cols = [name for name, _ in builds]
        title = "model-level ITDA Jaccard (union over layers)"
    width = max(len(c) for c in cols) + 2
    print(" " * (max(len(r) for r in rows) + 2) + "".join(f"{c:>{width}}" for c in cols))
    for r, values in zip(rows, matrix.tolist(), strict=True):
        print(f"{r:<{max(len(x) for x in rows) + 2}}" + "".join(f"{v:>{width}.3f}" for v in values))
    heatmap(matrix.tolist(), cmd.out, rows=rows, cols=cols, title=title)
    print(f"heatmap saved to {cmd.out}")
    return 0


def _cmd_diff(args: Any) -> int:
    cmd: DiffCommand = args.cmd
    cfg: BuildConfig = args.build
    out = output_folder(cmd.out, cmd.overwrite)
    if cmd.seqs < 1:
        raise ValueError("--seqs must be >= 1")
    t0 = time.perf_counter()
    device = cfg.device or default_device()  # --device: the models and the dictionaries
    base = resolve_model(cmd.base, device=device)
    ft = resolve_model(cmd.ft, device=device)
    hooks = cmd.hook
    if not hooks:
        n_layers = getattr(getattr(base, "cfg", None), "n_layers", None)
        if not isinstance(n_layers, int):
            raise ValueError(f"{cmd.base} is not a TransformerLens model: give --hook")
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    # a zoo fine-tune's card names the held-out text to diff it on
    data = cmd.data or model_card(cmd.ft).get("diff_data") or "kjv:heldout"
    source, data_name = resolve_tokens(data, base, split=cmd.split, context_size=cfg.context_size)
    tokenizer = getattr(base, "tokenizer", None)
    tokens = next(
        token_batches(source, cmd.seqs, context_size=cfg.context_size, tokenizer=tokenizer)
    )
    print(f"diffing {cmd.base} -> {cmd.ft} on {tokens.numel():,} tokens of {data_name}")
    if cmd.itdas is not None:
        loaded = [load_itdas(Path(cmd.itdas) / side) for side in ("base", "fine-tune")]
        keep = [h for h in loaded[0] if h in loaded[1] and (not cmd.hook or h in cmd.hook)]
        if not keep:
            raise ValueError(f"{cmd.itdas} holds no dictionary pair at {cmd.hook or 'any hook'}")
        d_base, d_ft = ({h: d[h] for h in keep} for d in loaded)
        diffs = diff_dictionaries(base, ft, d_base, d_ft, tokens, batch_size=cfg.batch_size)
    else:
        diffs = diff_models(
            base,
            ft,
            tokens,
            hooks,
            cfg.replace(device=device),
            names=(cmd.base, cmd.ft),
            dataset_path=data_name,
        )
    if cmd.itdas is None:
        # --overwrite: the previous run's dictionaries go only now that the new ones exist
        shutil.rmtree(out / "itdas", ignore_errors=True)
        for d in diffs:
            for side, itda in (("base", d.base), ("fine-tune", d.ft)):
                itda.save_model(out / "itdas" / side / d.hook)
    report = write_diff_report(
        diffs,
        out,
        tokenizer,
        base_name=cmd.base,
        ft_name=cmd.ft,
        data_name=data_name,
        top=cmd.top,
        seconds=time.perf_counter() - t0,
    )
    for d in diffs:
        top = d.scores.top(DIRECTIONS["fine-tune"], 1)
        where = (
            f"; top fine-tune context: {in_context(tokenizer, tokens[top[0][0]], top[0][1])}"
            if top and tokenizer is not None
            else ""
        )
        print(
            f"  {d.hook}: {d.base.cfg.d_sae} / {d.ft.cfg.d_sae} atoms, Jaccard {d.jaccard:.3f}{where}"
        )
    print(f"report written to {report} ({time.perf_counter() - t0:.0f} s)")
    itdas = Path(cmd.itdas) if cmd.itdas is not None else out / "itdas"
    print(f"next: itda-lens dashboard {itdas / 'fine-tune' / diffs[-1].hook}")
    return 0


def _token_file(path: str) -> torch.Tensor:
    """A [sequences, seq_len] token id file (.pt or .npy)."""
    tokens, _ = resolve_tokens(path, None)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"{path} must be a .pt or .npy file of [sequences, seq_len] token ids")
    return tokens


def _cmd_import_reference(args: Any) -> int:
    cmd: ImportReferenceCommand = args.cmd
    out = output_folder(cmd.out, cmd.overwrite)
    tokens = _token_file(cmd.tokens) if cmd.tokens else None
    itda = ITDA.from_reference(cmd.dir, tokens=tokens, hook_name=cmd.hook)
    itda.save_model(out)
    meta = itda.cfg.metadata
    record = itda.require_build_record()
    print(
        f"imported {itda.cfg.d_sae} atoms (d = {itda.cfg.d_in}, k = {itda.cfg.k}, "
        f"cos_threshold = {record.cos_threshold:.4f}) of {meta.model_name} at {meta.hook_name} "
        f"into {out}"
    )
    if tokens is None:
        print("the atoms' tokens are unknown: pass --tokens (the stream the reference read)")
    print(f"next: itda-lens inspect {out} --model MODEL --data DATA")
    return 0


def _cmd_export_reference(args: Any) -> int:
    cmd: ExportReferenceCommand = args.cmd
    out = output_folder(cmd.out, cmd.overwrite)
    itda = ITDA.load_from_disk(cmd.dir)
    itda.to_reference(out, loss_threshold=cmd.loss_threshold)
    print(f"wrote {itda.cfg.d_sae} atoms as atoms.pt, atom_indices.pt and metadata.yaml to {out}")
    return 0


def _cmd_demo(args: Any) -> int:
    cmd: DemoCommand = args.cmd
    cfg: BuildConfig = args.build
    sizes = {"n_train": 96, "n_heldout": 32} if cmd.quick else {}
    setup = default_setup(cmd.model, **sizes)
    if cmd.quick and cfg.target_atoms is not None:
        cfg = cfg.replace(target_atoms=min(cfg.target_atoms, 128))
    out = run_demo(cmd.out, setup, layers=cmd.layers, cfg=cfg, overwrite=cmd.overwrite)
    print(f"report written to {out / 'report.md'} (plots and saved ITDAs alongside)")
    print(f"next: itda-lens inspect {out / 'itdas' / f'blocks.{cmd.layers[0]}.hook_resid_post'}")
    return 0


def build_parser() -> ArgumentParser:
    """The ``itda-lens`` parser: one subcommand per job, its flags generated from its configs."""
    parser = ArgumentParser(prog="itda-lens", description=plain(__doc__), add_config_path_arg=False)
    parser.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="bytes the engine may use for Gram rows and chunk buffers, e.g. 4GiB "
        f"(default: ${ENV_VAR}, else {DEFAULT_FRACTION * 100:.0f}%% of the device's free memory)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = _parser(
        sub, "build", "build ITDA dictionaries at one or more hook points, or an ITDA transcoder"
    )
    p.add_arguments(BuildCommand, dest="cmd")
    p.add_arguments(BuildConfig, dest="build")
    p = _parser(
        sub, "inspect", "summarise a saved ITDA or ITDA transcoder and show its atoms in context"
    )
    p.add_arguments(InspectCommand, dest="cmd")
    p = _parser(
        sub, "dashboard", "write a browsable dashboard of a saved SAE, ITDA or transcoder folder"
    )
    p.add_arguments(DashboardCommand, dest="cmd")
    p = _parser(sub, "eval", "evaluate a saved sae_lens SAE, ITDA or transcoder folder (offline)")
    p.add_arguments(EvalCommand, dest="cmd")
    train = _parser(sub, "train", "train a comparison SAE on a hook's cached activations")
    archs = train.add_subparsers(dest="arch", required=True)
    for arch, trainer in TRAINERS.items():
        p = _parser(archs, arch, trainer.help)
        p.add_arguments(TrainCommand, dest="cmd")
        p.add_arguments(trainer.config, dest="train")
    p = _parser(sub, "similarity", "Jaccard similarity of ITDA dictionaries (layers and models)")
    p.add_arguments(SimilarityCommand, dest="cmd")
    p = _parser(sub, "diff", "diff a base model and its fine-tune through their ITDA dictionaries")
    p.add_arguments(DiffCommand, dest="cmd")
    p.add_arguments(BuildConfig, dest="build", default=DIFF_CONFIG)
    p = _parser(sub, "import-reference", "read the reference code's dictionary files into an ITDA")
    p.add_arguments(ImportReferenceCommand, dest="cmd")
    p = _parser(sub, "export-reference", "write a saved ITDA as the reference code's files")
    p.add_arguments(ExportReferenceCommand, dest="cmd")
    p = _parser(sub, "demo", "the main job: build, evaluate and report on the default zoo model")
    p.add_arguments(DemoCommand, dest="cmd")
    p.add_arguments(BuildConfig, dest="build", default=DEMO_CONFIG)
    return parser


COMMANDS: dict[str, Callable[[Any], int]] = {
    "build": _cmd_build,
    "inspect": _cmd_inspect,
    "dashboard": _cmd_dashboard,
    "eval": _cmd_eval,
    "train": _cmd_train,
    "similarity": _cmd_similarity,
    "diff": _cmd_diff,
    "demo": _cmd_demo,
    "import-reference": _cmd_import_reference,
    "export-reference": _cmd_export_reference,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.memory_budget is not None:
            set_memory_budget(args.memory_budget)
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:  # incl. IncompatibleLabels; programming errors still raise
        print(f"itda-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
