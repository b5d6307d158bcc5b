"""Warm starts: sae_lens *training* SAEs initialised from an ITDA's atoms or from activations.

An ITDA is a set of unit-norm activations read by signed matching pursuit; an SAE reads its
decoder rows with its own activation. :func:`init_from` copies the atoms into the first rows of
``W_dec`` and sets the encoder by a rule that respects that activation (rows beyond the atoms keep
sae_lens's initialisation, ``b_dec`` is zero as in the ITDA):

- ``decoder``: ``W_dec`` = atoms; the encoder stays as sae_lens initialised it.
- ``tied``: ``W_dec`` = atoms, ``W_enc`` = atoms.T, ``b_enc`` = 0.
- ``pairs``: ``W_dec`` = [atoms; -atoms], ``W_enc`` = ``W_dec``.T, ``b_enc`` = 0 (2 rows per atom).
  Codes over ±atoms are non-negative, so ReLU'd encoders see both signs; for the matching-pursuit
  SAE (``max_iterations`` = the ITDA's k, run to k steps, see ``training_config``) pursuit over the
  pairs *is* ITDA's signed MP, so its step-0 reconstruction equals the ITDA's.
- ``tied-fit`` / ``pairs-fit``: the same, then fitted on a sample of the SAE's inputs: the
  threshold (JumpReLU's ``threshold``, the standard SAE's ``-b_enc``, BatchTopK's running
  threshold) at the pre-activation quantile that leaves ``k`` latents per input on average, and
  one encoder gain by least squares, which minimises the step-0 reconstruction error exactly
  (the active set does not depend on a positive gain once thresholds scale with it).

``rule="auto"`` picks :data:`AUTO_RULE`'s rule per architecture, chosen by measurement on the zoo
model (kjv-4l128-s0, blocks.2.hook_resid_post, 1024 latents, k = 16; numbers in the module's
tests and ``benchmarks/warm_start.py``): ``pairs`` for matching pursuit (the ITDA exactly),
``tied-fit`` for the one-shot encoders. Without the fit the tied copy overshoots (step-0 FVU ~30:
the atoms are correlated activations and a one-shot encoder adds all k of their correlations); no
linear encoder reproduces MP over non-orthogonal atoms, so their step-0 FVU stays well above the
ITDA's (measured 0.34 for TopK/AbsTopK, ~0.6 for BatchTopK/JumpReLU/standard against the ITDA's
0.09 — the bounds the tests assert), but they still start far below sae_lens's init (~1.1) and
train to a lower FVU on the same budget.

Inputs: ``train_sae`` trains on activations scaled to mean norm ``sqrt(d)``; atoms are directions,
so they need no rescaling, but the fitted thresholds live on the SAE's input scale, which is why
the sample is given on that scale. Sizes: the caller sizes the ITDA (``target_atoms``): a rule
needs :func:`init_rows` rows and a source with more is refused (crop it with ``itda.crop``), one
with fewer than ``k`` atoms too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float
from sae_lens.saes.sae import TrainingSAE
from torch import Tensor

from itda_lens.saes import ITDA, check_sae_folder

Rule = Literal["auto", "decoder", "tied", "pairs", "tied-fit", "pairs-fit"]
RULES: tuple[Rule, ...] = get_args(Rule)
#: the rule ``"auto"`` stands for, per sae_lens training architecture (measured; module doc)
AUTO_RULE: dict[str, Rule] = {
    "matching_pursuit": "pairs",
    "topk": "tied-fit",
    "batchtopk": "tied-fit",
    "abstopk": "tied-fit",
    "standard": "tied-fit",
    "jumprelu": "tied-fit",
}
#: inputs of the fit sample the thresholds and the gain are fitted on (rows beyond are not read)
FIT_SAMPLE = 8192


@dataclass(frozen=True)
class InitSource:
    """Unit-norm atoms to start an SAE from, and where they came from (recorded in metadata)."""

    atoms: Float[Tensor, "n d"]
    origin: str  # an ITDA folder, "ITDA" (in memory) or "activations"
    itda_k: int | None = None
    hook_name: str | None = None

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]


def as_source(source: InitSource | ITDA | Tensor | str | Path) -> InitSource:
    """An :class:`InitSource` from an ITDA, a saved ITDA folder, or vectors (normalised on the way
    in; zero, NaN or Inf rows refused, as ``ITDA.from_atoms`` does)."""
    if isinstance(source, InitSource):
        return source
    if isinstance(source, str | Path):
        folder = Path(source)
        arch = check_sae_folder(folder).get("architecture")
        if arch != "itda":
            raise ValueError(
                f"{folder} holds a {arch!r} SAE, not an ITDA: a warm start takes an ITDA folder "
                "(made by `itda-lens build` or ITDA.save_model)"
            )
        return _from_itda(ITDA.load_from_disk(folder), str(folder))
    if isinstance(source, ITDA):
        return _from_itda(source, "ITDA")
    if isinstance(source, Tensor):
        if source.ndim != 2:
            raise ValueError(f"atoms must be a [n, d_in] tensor, got shape {tuple(source.shape)}")
        return InitSource(
            ITDA.from_atoms(source.detach().float(), k=1).W_dec.detach(), "activations"
        )
    raise TypeError(
        f"a warm start takes an ITDA, an ITDA folder or a [n, d_in] tensor, got {type(source).__name__}"
    )


def _from_itda(itda: ITDA, origin: str) -> InitSource:
    return InitSource(
        itda.W_dec.detach().float().clone(), origin, itda.cfg.k, itda.cfg.metadata.hook_name
    )


def random_activations(
    acts: Float[Tensor, "n d"], n_atoms: int, *, seed: int = 0, hook_name: str | None = None
) -> InitSource:
    """``n_atoms`` activations drawn at random (no repeats, zero rows skipped) as a source: the
    control for an ITDA of the same size."""
    control = ITDA.from_random_activations(acts, n_atoms, 1, seed=seed)
    return replace(as_source(control.W_dec.detach()), hook_name=hook_name)


def resolve_rule(architecture: str, rule: Rule) -> Rule:
    """``rule``, or the architecture's :data:`AUTO_RULE` for ``"auto"``; refuses combinations that
    cannot work (matching pursuit's encoder is its decoder: nothing to fit)."""
    if architecture not in AUTO_RULE:
        raise ValueError(
            f"no warm start for architecture {architecture!r}; one of {', '.join(AUTO_RULE)}"
        )
    if rule not in RULES:
        raise ValueError(f"unknown warm-start rule {rule!r}; one of {', '.join(RULES)}")
    if rule == "auto":
        return AUTO_RULE[architecture]
    if architecture == "matching_pursuit" and rule.endswith("-fit"):
        raise ValueError(
            "the matching-pursuit SAE's encoder is its decoder (tied, exact projections): "
            "there is nothing to fit; use 'pairs' (ITDA's signed MP) or 'tied'"
        )
    return rule


def init_rows(rule: Rule, n_atoms: int) -> int:
    """SAE rows (latents) a rule fills with ``n_atoms`` atoms (resolve ``"auto"`` first)."""
    return 2 * n_atoms if rule.startswith("pairs") else n_atoms


def l0_target(sae: TrainingSAE[Any]) -> int | None:
    """The SAE's L0 budget as its config states it (TopK's k, MP's max_iterations, JumpReLU's
    target_l0), or None (the standard SAE has only an L1 coefficient)."""
    for name in ("k", "max_iterations", "target_l0"):
        value = getattr(sae.cfg, name, None)
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def init_from(
    sae: TrainingSAE[Any],
    source: InitSource | ITDA | Tensor | str | Path,
    rule: Rule = "auto",
    *,
    sample: Float[Tensor, "n d"] | None = None,
    k: int | None = None,
    hook_name: str | None = None,
) -> dict[str, Any]:
    """Initialise a sae_lens training SAE in place from ``source``'s atoms by ``rule`` (module doc).

    ``sample``: inputs on the scale the SAE will see them (``train_sae`` passes activations times
    the trainer's normalisation factor); the ``-fit`` rules need it. ``k``: the L0 the fit aims at
    (default: the SAE's own, :func:`l0_target`; the standard SAE needs it). ``hook_name``: the hook
    the SAE will be trained on (default: its metadata's); an ITDA read elsewhere is refused.
    Parameters are written in place, so an optimiser made before keeps them. Returns the record
    also stored in ``sae.cfg.metadata["init"]``.
    """
    src = as_source(source)
    arch = sae.cfg.architecture()
    rule = resolve_rule(arch, rule)
    n, d_in = src.atoms.shape
    if d_in != sae.cfg.d_in:
        raise ValueError(f"d_in mismatch: the atoms have {d_in} dimensions, the SAE {sae.cfg.d_in}")
    hook = hook_name or sae.cfg.metadata.hook_name
    if hook and src.hook_name and hook != src.hook_name:
        raise ValueError(
            f"the ITDA was built at {src.hook_name!r} but the SAE trains on {hook!r}: "
            "build the ITDA at the training hook"
        )
    k = k if k is not None else l0_target(sae)
    if k is not None and n < k:
        raise ValueError(f"too few atoms: {n}, fewer than the L0 budget k = {k}")
    m = init_rows(rule, n)
    if m > sae.cfg.d_sae:
        raise ValueError(
            f"rule {rule!r} needs {m} latents for {n} atoms but the SAE has d_sae = "
            f"{sae.cfg.d_sae}: size the ITDA to {sae.cfg.d_sae // (m // n)} atoms "
            "(target_atoms, or itda.crop) or widen the SAE"
        )
    atoms = src.atoms.to(sae.W_dec.device, sae.W_dec.dtype)
    rows = torch.cat([atoms, -atoms]) if rule.startswith("pairs") else atoms
    sae.W_dec.data[:m] = rows
    sae.b_dec.data.zero_()
    if rule != "decoder" and arch != "matching_pursuit":  # MP's W_enc is W_dec.T already
        sae.W_enc.data[:, :m] = rows.T
        sae.b_enc.data[:m] = 0
    record: dict[str, Any] = {
        "from": src.origin,
        "n_atoms": n,
        "rule": rule,
        "rows": m,
        "itda_k": src.itda_k,
        "itda_hook": src.hook_name,
    }
    if rule.endswith("-fit"):
        if sample is None:
            raise ValueError(f"rule {rule!r} fits the encoder on a sample: pass sample=")
        if k is None:
            raise ValueError(f"rule {rule!r} on a {arch} SAE needs the L0 to aim at: pass k=")
        record.update(_fit(sae, m, sample[:FIT_SAMPLE].to(sae.W_dec), k))
    sae.cfg.metadata["init"] = record
    return record


def _fit(sae: TrainingSAE[Any], m: int, x: Tensor, k: int) -> dict[str, float]:
    """Thresholds at the pre-activation quantile leaving ``k`` of the ``m`` atom rows active per
    input, then the least-squares gain of the atom rows' contribution (module doc)."""
    arch = sae.cfg.architecture()
    out: dict[str, float] = {}
    if arch in ("standard", "jumprelu"):
        pre = (sae.process_sae_in(x) @ sae.W_enc[:, :m]).flatten()
        t = float(pre.kthvalue(max(1, round((1 - k / m) * pre.numel()))).values)
        if arch == "jumprelu":
            sae.threshold.data[:m] = t
        else:
            sae.b_enc.data[:m] = -t
        out["threshold"] = t
    z = sae.encode(x)
    atom_part, rest = z.clone(), z.clone()
    atom_part[:, m:] = 0
    rest[:, :m] = 0
    base = sae.decode(torch.zeros_like(z))
    y = sae.decode(atom_part) - base
    target = x - sae.decode(rest)
    gain = float((target * y).sum() / (y * y).sum())
    if not gain > 0:
        raise ValueError(f"the fitted encoder gain is {gain}: the sample does not fit these atoms")
    sae.W_enc.data[:, :m] *= gain
    sae.b_enc.data[:m] *= gain
    if arch == "jumprelu":
        sae.threshold.data[:m] *= gain
    if arch == "batchtopk":  # the running threshold the inference JumpReLU starts from
        z = sae.encode(x)
        sae.topk_threshold.fill_(float(z[z > 0].min()))
        out["topk_threshold"] = float(sae.topk_threshold)
    out["encoder_gain"] = gain
    return out
