"""Transcoders: ITDA against TopK, replacing a layer's MLP, side by side.

At each layer L of ``kjv-4l128-s0`` (``--quick``: one layer) a transcoder maps the MLP's input
``blocks.L.ln2.hook_normalized`` to its output ``blocks.L.hook_mlp_out``:

* **ITDA (judge output)**: ``build_itda_transcoder`` (exact sequential rule, MP with ``k`` steps),
  reading the training windows in order until ``max_atoms = width`` pairs are in (sized by
  ``max_atoms`` at a fixed ``cos_threshold``); its width n and L0 (mean distinct nonzeros per
  token) are measured;
* **TopK (sparsify)**: eai-sparsify 1.3.3's ``SparseCoder`` in transcoder mode
  (``TranscoderConfig``) at the same width n and k = the ITDA's L0 rounded (measured on training
  pairs the build did not read), trained by a plain loop on cached (x, y) training pairs with
  sparsify's own loss (FVU) and the recipe of its ``Trainer``: mean-centred encoder bias and
  ``b_dec`` = mean output at step 0, its default optimizer (schedule-free sign-SGD, evaluated at
  the averaged weights) at its default learning rate, a fixed number of steps (``--optimizer adam``:
  its Adam, linear warm-up and decay); spliced in as a sae_lens ``Transcoder`` with sparsify's
  encoder (ReLU, then the k largest), checked against ``SparseCoder`` on held-out inputs;
* **random pairs, MP**: ``ITDATranscoder.from_pairs`` on n random training tokens' (x, y) pairs,
  with the same pursuit and k (the control: what the add rule's choice of pairs is worth);
* **ITDA (judge input)**: the same build judged on the input's reconstruction, same width and k;
* **ITDA + skip**: ``skip_connection=True``: a linear term ``x @ W_skip.T + b`` fitted by least
  squares on the first 16,384 training tokens, the pairs' outputs (and the output judge) what it
  leaves; **ITDA + skip, LS decoder**: also ``refit_decoder=True`` (the output atoms refitted by
  least squares on that sample's codes); **ITDA (judge input) + skip** (**, LS decoder**): the
  input judge's pairs (the rule in the CPU kernel) with the skip term (and the LS decoder);
* **ITDA, OMP encoder** / **ITDA, GP encoder**: the judge-output build's pairs encoded with OMP
  or non-negative gradient pursuit (``with_encoder``; sparsify's experimental ITDA encoder);
* **TopK + skip (sparsify)**: sparsify's transcoder with its ``skip_connection`` (trained the same
  way), the peer of the ITDA + skip variants.

Each is scored by ``itda_lens.evals.transcoder_scores`` on the same held-out windows (spliced in
with ``HookedSAETransformer.add_sae``, special tokens neither spliced, ablated nor scored): clean
CE, zero-ablated-MLP CE, spliced CE (and with the error term, checked to give back the clean CE),
the fraction of CE recovered ``(zero - spliced) / (zero - clean)``, output FVU, L0 and dead
latents (never nonzero on the held-out tokens). Wall-clock ("fit s"): the ITDA build's
time outside the model's forward passes (the rule, and the sample's fits), and the TopK's training
loop; the forward passes (the ITDA's own, the TopK's shared activation cache) apart.

    python benchmarks/transcoders.py                 # full run (see benchmarks/README.md)
    python benchmarks/transcoders.py --quick --out bench_out/transcoders_q
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: sparsify's eager sparse decoder

import numba
import torch
import torch.nn.functional as F
from _common import bench_parser, prepare, record, table, table_spec
from sae_lens import HookedSAETransformer
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder
from sparsify import TranscoderConfig as SparsifyTranscoderConfig
from sparsify.sign_sgd import SignSGD
from torch import Tensor
from transformers import get_linear_schedule_with_warmup
from typing_extensions import override

from itda_lens import ITDATranscoder, build_itda_transcoder, zoo
from itda_lens.activations import iter_hook_activations
from itda_lens.evals import transcoder_scores
from itda_lens.saes import SkipThroughDecode

MODEL = "kjv-4l128-s0"
ITDA_OUT, ITDA_IN = "ITDA (judge output)", "ITDA (judge input)"
ITDA_SKIP, ITDA_LSQ = "ITDA + skip", "ITDA + skip, LS decoder"
ITDA_IN_SKIP, ITDA_IN_LSQ = "ITDA (judge input) + skip", "ITDA (judge input) + skip, LS decoder"
TOPK, TOPK_SKIP, RANDOM = "TopK (sparsify)", "TopK + skip (sparsify)", "random pairs, MP"
#: the ITDA builds: label -> (judge, build_itda_transcoder options)
ITDA_BUILDS: dict[str, tuple[str, dict[str, bool]]] = {
    ITDA_OUT: ("output", {}),
    ITDA_IN: ("input", {}),
    ITDA_SKIP: ("output", {"skip_connection": True}),
    ITDA_LSQ: ("output", {"skip_connection": True, "refit_decoder": True}),
    ITDA_IN_SKIP: ("input", {"skip_connection": True}),
    ITDA_IN_LSQ: ("input", {"skip_connection": True, "refit_decoder": True}),
}
#: tokens at the start of the stream the skip term and the LS decoder are fitted on
#: (``target_sample_tokens``): ~128 pairs per input dimension of this model
SKIP_SAMPLE_TOKENS = 16_384
#: the judge-output build's pairs encoded by the field's other encoders (no rebuild)
ITDA_OMP, ITDA_GP = "ITDA, OMP encoder", "ITDA, GP encoder"
ENCODERS = {ITDA_OMP: "omp", ITDA_GP: "gp"}
#: every ITDA variant
ITDAS = [*ITDA_BUILDS, *ENCODERS]
#: the variants with a skip term (compared with the TopK that has one)
SKIP_ITDAS = [ITDA_SKIP, ITDA_LSQ, ITDA_IN_SKIP, ITDA_IN_LSQ]
#: the table's order
METHODS = [
    ITDA_OUT,
    ITDA_OMP,
    ITDA_GP,
    ITDA_SKIP,
    ITDA_LSQ,
    ITDA_IN,
    ITDA_IN_SKIP,
    ITDA_IN_LSQ,
    TOPK,
    TOPK_SKIP,
    RANDOM,
]
#: cos_threshold judged on the output; on the input, per k: high enough that the build fills the
#: width within the training windows (a better input reconstruction at larger k adds fewer pairs)
THRESHOLD_OUT, THRESHOLD_IN = 0.8, {8: 0.9, 16: 0.95}
#: the issue's goal: within this many nats of the TopK's spliced CE ...
GOAL_NATS = 0.05
#: ... in at most this fraction of its wall-clock
GOAL_TIME = 0.05


def thresholds(args: argparse.Namespace, k: int) -> dict[str, float]:
    """The ITDA builds' cos_threshold per judge at ``k`` pursuit steps."""
    given = args.threshold_in
    return {"output": args.threshold, "input": THRESHOLD_IN.get(k, 0.9) if given is None else given}


def pin_threads(n: int) -> None:
    """``n`` torch and numba threads: numba's OpenMP layer resets torch's count when the ITDA's
    pursuit kernels first run, so this is called again after every ITDA build."""
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def hooks(layer: int) -> tuple[str, str]:
    """The MLP's input and output hooks at ``layer``."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def cache_pairs(
    model: HookedSAETransformer, tokens: Tensor, layers: list[int]
) -> tuple[dict[int, tuple[Tensor, Tensor]], float]:
    """(x, y) at every layer's MLP hooks for the non-special tokens; forward seconds."""
    names = [h for layer in layers for h in hooks(layer)]
    xs: dict[str, list[Tensor]] = {h: [] for h in names}
    seconds = 0.0
    for batch in iter_hook_activations(model, tokens, names, batch_size=32):
        seconds += batch.forward_seconds
        for h in names:
            xs[h].append(batch.kept(h).float())
    pairs = {layer: tuple(torch.cat(xs[h]) for h in hooks(layer)) for layer in layers}
    return pairs, seconds  # type: ignore[return-value]


class TopKSkipTranscoder(SkipTranscoder):
    """A sae_lens ``SkipTranscoder`` with sparsify's TopK encoder: ReLU, then the ``k`` largest."""

    def __init__(self, cfg: SkipTranscoderConfig, k: int):
        super().__init__(cfg)
        self.k = k

    @override
    def encode(self, x: Tensor) -> Tensor:
        sae_in = self.process_sae_in(x)
        pre = F.relu(self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc))
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return self.hook_sae_acts_post(torch.zeros_like(pre).scatter_(-1, idx, vals))


class TopKTranscoder(SkipThroughDecode, TopKSkipTranscoder):
    """The TopK transcoder with its skip term (zero without one) carried through ``encode`` then
    ``decode``, which is how ``HookedSAETransformer`` splices (``SkipTranscoder.forward``, which
    adds it, is bypassed there)."""


def to_sae_lens(coder: SparseCoder, hook_in: str, hook_out: str) -> TopKTranscoder:
    """The trained ``SparseCoder`` as a sae_lens transcoder attachable with ``add_sae``."""
    assert coder.W_dec is not None
    cfg = SkipTranscoderConfig(
        d_in=coder.d_in,
        d_sae=coder.num_latents,
        d_out=coder.W_dec.shape[1],
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook_in, hook_name_out=hook_out, model_name=MODEL),
    )
    tc = TopKTranscoder(cfg, coder.cfg.k)
    with torch.no_grad():
        tc.W_enc.copy_(coder.encoder.weight.T)
        tc.b_enc.copy_(coder.encoder.bias)
        tc.W_dec.copy_(coder.W_dec)
        tc.b_dec.copy_(coder.b_dec)
        if coder.W_skip is not None:
            tc.W_skip.copy_(coder.W_skip)
    return tc


def train_topk(
    x: Tensor,
    y: Tensor,
    width: int,
    k: int,
    steps: int,
    batch: int,
    optimizer: str = "signum",
    seed: int = 0,
    skip: bool = False,
) -> tuple[SparseCoder, float]:
    """sparsify's transcoder trained on (x, y) by its ``Trainer``'s recipe (module doc) for
    ``steps`` steps of ``batch`` random pairs, with one of the ``Trainer``'s optimizers at its
    default learning rate: ``"adam"`` (linear warm-up over a tenth of the steps, then linear decay
    to 0) or ``"signum"`` (schedule-free sign-SGD); returns it and its last batch's FVU."""
    torch.manual_seed(seed)
    coder = SparseCoder(
        x.shape[1], SparsifyTranscoderConfig(num_latents=width, k=k, skip_connection=skip)
    )
    with torch.no_grad():  # the Trainer's step-0 initialisation
        coder.encoder.bias.copy_(-x.mean(0) @ coder.encoder.weight.T)
        coder.b_dec.copy_(y.mean(0))
    scale = (width / 2**14) ** 0.5
    if optimizer == "adam":
        opt: Any = torch.optim.Adam(coder.parameters(), lr=2e-4 / scale)
        sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    elif optimizer == "signum":
        opt = ScheduleFreeWrapper(
            SignSGD([{"params": coder.parameters(), "lr": 5e-3 / scale}]), momentum=0.95
        )
        opt.train()
        sched = None
    else:
        raise ValueError(f"optimizer must be 'adam' or 'signum', got {optimizer!r}")
    gen = torch.Generator().manual_seed(seed)
    last = math.nan
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = coder(x[idx], y[idx]).fvu
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        last = float(loss.detach())
    if optimizer == "signum":
        opt.eval()  # schedule-free: evaluate at the averaged weights
    return coder, last


def sparse_l0(codes: Tensor) -> Tensor:
    """Distinct nonzero latents per token."""
    return (codes != 0).sum(-1).double()


@torch.no_grad()
def l0_on(tc: ITDATranscoder, x: Tensor, chunk: int = 4096) -> float:
    """Mean distinct nonzeros per token of ``tc`` on ``x``."""
    return float(
        torch.cat([sparse_l0(tc.encode(x[s : s + chunk])) for s in range(0, len(x), chunk)]).mean()
    )


def run_layer(
    args: argparse.Namespace,
    model: HookedSAETransformer,
    layer: int,
    train: Tensor,
    train_pairs: tuple[Tensor, Tensor],
    heldout: Tensor,
    k: int,
) -> list[dict[str, Any]]:
    """Every transcoder at one layer and ITDA pursuit steps ``k``, scored on the held-out
    windows."""
    hook_in, hook_out = hooks(layer)
    x, y = train_pairs
    fitted: dict[str, tuple[Transcoder, dict[str, Any]]] = {}
    for label, (judge, options) in ITDA_BUILDS.items():
        t0 = time.perf_counter()
        itda = build_itda_transcoder(
            model,
            train,
            hook_in,
            hook_out,
            k=k,
            cos_threshold=thresholds(args, k)[judge],
            max_atoms=args.width,
            judge=judge,
            progress=False,
            target_sample_tokens=args.skip_sample_tokens,
            **options,
        )
        wall = time.perf_counter() - t0
        pin_threads(args.threads)
        rec = itda.build_record
        assert rec is not None
        fitted[label] = (
            itda,
            {
                # everything but the model's forward passes: the rule, and the sample's fits
                "fit_s": wall - rec.forward_seconds,
                "rule_s": rec.dictionary_seconds,
                "forward_s": rec.forward_seconds,
                "wall_s": wall,
                "tokens_read": rec.tokens_seen,
                "threshold": rec.cos_threshold,
                "stop": rec.stop_reason or "tokens ran out",
            },
        )
    itda = fitted[ITDA_OUT][0]
    for label, encoder in ENCODERS.items():
        fitted[label] = (itda.with_encoder(encoder), dict(fitted[ITDA_OUT][1]))
    width = itda.cfg.d_sae
    itda_train_l0 = l0_on(itda, x[-args.l0_tokens :])  # training pairs the build did not read
    k_topk = max(1, round(itda_train_l0))
    for label, skip in ((TOPK, False), (TOPK_SKIP, True)):
        pin_threads(args.threads)
        t0 = time.perf_counter()
        coder, last_fvu = train_topk(
            x, y, width, k_topk, args.steps, args.batch, args.optimizer, skip=skip
        )
        train_s = time.perf_counter() - t0
        topk = to_sae_lens(coder, hook_in, hook_out)
        with torch.no_grad():  # the sae_lens form decodes exactly as sparsify does
            probe = x[-1024:]  # training pairs past the ones it saw most (any inputs would do)
            want = coder(probe).sae_out
            assert torch.allclose(topk(probe), want, atol=1e-4), "TopK conversion mismatch"
        fitted[label] = (
            topk,
            {
                "fit_s": train_s,
                "wall_s": train_s,
                "steps": args.steps,
                "optimizer": args.optimizer,
                "samples": args.steps * args.batch,
                "train_fvu": last_fvu,
            },
        )
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(layer))[:width]
    t0 = time.perf_counter()
    rand = ITDATranscoder.from_pairs(x[pick], y[pick], k, hook_name=hook_in, hook_name_out=hook_out)
    rand_s = time.perf_counter() - t0
    fitted[RANDOM] = (rand, {"fit_s": rand_s, "wall_s": rand_s})
    rows = []
    for label in METHODS:
        tc, info = fitted[label]
        with torch.no_grad():
            scores = transcoder_scores(tc, model, heldout, batch_size=32)
        # the splice is right: with the error term it gives back the clean loss
        assert abs(scores["ce_loss_with_error_term"] - scores["ce_loss_without_sae"]) < 1e-4
        rows.append(
            {
                "layer": layer,
                "itda_k": k,
                "method": label,
                "width": tc.cfg.d_sae,
                "k": k_topk if label in (TOPK, TOPK_SKIP) else k,
                "ce_clean": scores["ce_loss_without_sae"],
                "ce_zero": scores["ce_loss_with_ablation"],
                "ce": scores["ce_loss_with_sae"],
                "ce_error_term": scores["ce_loss_with_error_term"],
                "recovered": scores["ce_loss_score"],
                "fvu": scores["fvu"],
                "l0": scores["l0"],
                "dead": round(scores["dead_fraction"] * tc.cfg.d_sae),
                "dead_frac": scores["dead_fraction"],
                **info,
            }
        )
    clean, zero = rows[0]["ce_clean"], rows[0]["ce_zero"]
    rows[0]["train_l0"] = itda_train_l0
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["ce_gap_to_topk"] = r["ce"] - by[TOPK]["ce"]
        r["time_over_topk"] = r["fit_s"] / by[TOPK]["fit_s"]
    print(
        f"  layer {layer}, k {k}: clean {clean:.3f}, zero-ablated {zero:.3f}; "
        + ", ".join(f"{r['method']} CE {r['ce']:.3f} ({r['fit_s']:.1f} s)" for r in rows),
        flush=True,
    )
    return rows


def summarise(rows: list[dict[str, Any]], cache_s: float) -> dict[str, Any]:
    """Per layer and k: each ITDA variant's CE gap to the TopK (and, for the skip variants, to the
    TopK with a skip term) in nats and its fit time over the TopK's; the best ITDA variant by
    spliced CE and whether it meets the issue's goal; and the counts over all cases."""
    cases = []
    for layer, k in dict.fromkeys((r["layer"], r["itda_k"]) for r in rows):
        by = {r["method"]: r for r in rows if (r["layer"], r["itda_k"]) == (layer, k)}
        topk, topk_skip, rand = by[TOPK], by[TOPK_SKIP], by[RANDOM]
        best = min(ITDAS, key=lambda m: by[m]["ce"])
        itda = by[best]
        cases.append(
            {
                "layer": layer,
                "itda_k": k,
                "width": by[ITDA_OUT]["width"],
                "itda_l0": by[ITDA_OUT]["l0"],
                "topk_k": topk["k"],
                "ce_gap_nats": {m: by[m]["ce"] - topk["ce"] for m in ITDAS},
                "skip_ce_gap_nats": {m: by[m]["ce"] - topk_skip["ce"] for m in SKIP_ITDAS},
                "time_ratio": {m: by[m]["fit_s"] / topk["fit_s"] for m in ITDAS},
                "random_gap_nats": rand["ce"] - topk["ce"],
                "random_ce_goal_met": rand["ce"] - topk["ce"] <= GOAL_NATS,
                "recovered": {m: r["recovered"] for m, r in by.items()},
                "fvu": {m: r["fvu"] for m, r in by.items()},
                "best": best,
                "best_ce_gap_nats": itda["ce"] - topk["ce"],
                "best_time_ratio": itda["fit_s"] / topk["fit_s"],
                "ce_goal_met": itda["ce"] - topk["ce"] <= GOAL_NATS,
                "time_goal_met": itda["fit_s"] <= GOAL_TIME * topk["fit_s"],
                # every ITDA variant that meets both halves of the goal
                "goal_variants": [
                    m
                    for m in ITDAS
                    if by[m]["ce"] - topk["ce"] <= GOAL_NATS
                    and by[m]["fit_s"] <= GOAL_TIME * topk["fit_s"]
                ],
                "skip_beats_topk_skip": by[ITDA_LSQ]["ce"] <= topk_skip["ce"],
                "skip_best": (sb := min(SKIP_ITDAS, key=lambda m: by[m]["ce"])),
                "skip_best_ce_gap_nats": by[sb]["ce"] - topk_skip["ce"],
                "skip_best_time_ratio": by[sb]["fit_s"] / topk_skip["fit_s"],
            }
        )
    for s in cases:
        s["goal_met"] = bool(s["goal_variants"])
        s["skip_goal_met"] = (
            s["skip_best_ce_gap_nats"] <= GOAL_NATS and s["skip_best_time_ratio"] <= GOAL_TIME
        )
    gaps = [g for s in cases for g in s["ce_gap_nats"].values()]
    return {
        "cases": cases,
        "cases_goal_met": sum(s["goal_met"] for s in cases),
        "cases_ce_goal_met": sum(s["ce_goal_met"] for s in cases),
        "cases_time_goal_met": sum(s["time_goal_met"] for s in cases),
        "n_cases": len(cases),
        "best_counts": {m: sum(s["best"] == m for s in cases) for m in ITDAS},
        "random_cases_ce_goal_met": sum(s["random_ce_goal_met"] for s in cases),
        "itda_beats_random": sum(s["ce_gap_nats"][ITDA_OUT] < s["random_gap_nats"] for s in cases),
        "lsq_beats_topk_skip": sum(s["skip_beats_topk_skip"] for s in cases),
        "skip_cases_goal_met": sum(s["skip_goal_met"] for s in cases),
        "skip_cases_ce_goal_met": sum(s["skip_best_ce_gap_nats"] <= GOAL_NATS for s in cases),
        "ce_gap_range": [min(gaps), max(gaps)],
        "best_ce_gap_range": [
            min(s["best_ce_gap_nats"] for s in cases),
            max(s["best_ce_gap_nats"] for s in cases),
        ],
        "best_time_ratio_range": [
            min(s["best_time_ratio"] for s in cases),
            max(s["best_time_ratio"] for s in cases),
        ],
    }


COLUMNS = [
    "layer",
    "method",
    "width",
    "k",
    "L0",
    "dead",
    "CE clean",
    "CE zero-ablated",
    "CE spliced",
    "CE gap to TopK",
    "CE recovered",
    "output FVU",
    "tokens read / samples",
    "fit s",
    "fit / TopK",
]


def shown(r: dict[str, Any]) -> dict[str, Any]:
    """A row as the table prints it."""
    seen = r.get("tokens_read", r.get("samples", ""))
    return {
        "layer": r["layer"],
        "method": r["method"],
        "width": r["width"],
        "k": r["k"],
        "L0": f"{r['l0']:.2f}",
        "dead": f"{r['dead']} ({r['dead_frac']:.1%})",
        "CE clean": f"{r['ce_clean']:.3f}",
        "CE zero-ablated": f"{r['ce_zero']:.3f}",
        "CE spliced": f"{r['ce']:.3f}",
        "CE gap to TopK": f"{r['ce_gap_to_topk']:+.3f}",
        "CE recovered": f"{r['recovered']:.3f}",
        "output FVU": f"{r['fvu']:.3f}",
        "tokens read / samples": f"{seen:,}" if seen != "" else "",
        "fit s": f"{r['fit_s']:.1f}",
        "fit / TopK": f"{r['time_over_topk']:.3f}",
    }


def main() -> None:
    parser = bench_parser(__doc__, "bench_out/transcoders")
    parser.add_argument("--ks", type=int, nargs="*", default=None, help="ITDA pursuit steps")
    parser.add_argument("--width", type=int, default=1024, help="max_atoms (ITDA width)")
    parser.add_argument(
        "--skip-sample-tokens",
        type=int,
        default=SKIP_SAMPLE_TOKENS,
        help="tokens the skip term and LS decoder are fitted on",
    )
    parser.add_argument(
        "--threshold", type=float, default=THRESHOLD_OUT, help="cos_threshold, judge output"
    )
    parser.add_argument(
        "--threshold-in", type=float, default=None, help="cos_threshold, judge input"
    )
    parser.add_argument("--steps", type=int, default=None, help="TopK training steps")
    parser.add_argument("--batch", type=int, default=4096, help="TopK batch (pairs)")
    parser.add_argument(
        "--optimizer", choices=["signum", "adam"], default="signum", help="TopK (sparsify's)"
    )
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    args = parser.parse_args()
    if args.quick:
        args.layers = args.layers if args.layers is not None else [1]
        args.ks = args.ks or [8]
        args.width, args.steps = min(args.width, 128), args.steps or 40
        args.train_windows, args.heldout_windows, args.l0_tokens = 16, 8, 1024
    else:
        args.layers = args.layers if args.layers is not None else [0, 1, 2, 3]
        args.ks = args.ks or [8, 16]
        args.steps = args.steps or 300
        args.train_windows, args.heldout_windows, args.l0_tokens = 1024, 128, 8192
    prepare(args)
    pin_threads(args.threads)
    t0 = time.perf_counter()
    model = zoo.load_model(MODEL)
    train = zoo.load_tokens("train", args.train_windows)
    heldout = zoo.load_tokens("heldout", args.heldout_windows)
    pairs, cache_s = cache_pairs(model, train, args.layers)
    n_train = next(iter(pairs.values()))[0].shape[0]
    print(
        f"{MODEL}: {n_train:,} training pairs per layer cached in {cache_s:.1f} s; "
        f"{heldout.numel():,} held-out tokens; k {args.ks}, width {args.width}, thresholds "
        f"{[thresholds(args, k) for k in args.ks]}, TopK {args.steps} steps x {args.batch}",
        flush=True,
    )
    rows = []
    for layer in args.layers:
        for k in args.ks:
            rows += run_layer(args, model, layer, train, pairs[layer], heldout, k)
    summary = summarise(rows, cache_s)
    summary["cache_s"] = cache_s
    summary["train_pairs"] = n_train
    summary["heldout_tokens"] = heldout.numel()
    print(table([shown(r) for r in rows], COLUMNS))
    for s in summary["cases"]:
        print(
            f"layer {s['layer']}, k {s['itda_k']}: best ITDA {s['best']}, ITDA / TopK time "
            f"{s['best_time_ratio']:.3f}, CE gap to TopK {s['best_ce_gap_nats']:+.3f} nats "
            f"(random pairs {s['random_gap_nats']:+.3f}); goal (<= {GOAL_NATS} nats in <= "
            f"{GOAL_TIME:.0%} of the time) met by {s['goal_variants'] or 'none'}; with skip "
            f"terms: best {s['skip_best']}, {s['skip_best_ce_gap_nats']:+.3f} nats to TopK + skip "
            f"in {s['skip_best_time_ratio']:.3f} of its time"
        )
    record(
        "transcoders",
        args,
        {"main": table_spec([shown(r) for r in rows], COLUMNS)},
        {"rows": rows, "summary": summary, "settings": vars(args)},
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
