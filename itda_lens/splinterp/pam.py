"""PAM-SGD (SplInterp, Budd et al. 2025): TopK / AbsTopK / ReLU SAEs with a closed-form decoder.

The reconstruction loss is a linear least-squares problem in the decoder once the encoder is
fixed, so each outer iteration (one epoch) solves the decoder exactly from streamed sufficient
statistics (``DecoderStats``: ``Σzzᵀ, Σxzᵀ, Σz, Σx, Σ‖x‖², N``; memory independent of N) and then
takes Adam steps on the encoder only, with proximal "stay-close" terms anchoring it to the values
at the start of the epoch. ``decoder="adam"`` turns the closed-form step off (decoder trained by
Adam in the same loop): the ablation the sample-efficiency claim is about.

The decoder update is the exact normal equations of ``splinterp.md`` §1.3, not the reference
code's uncentred fit + mean-residual bias. Codes are sae_lens's, so the result is a plain sae_lens
SAE: ``activation="topk"`` (default) is top-k then ReLU (``topk``), ``"abstopk"`` the authors'
abs-TopK, the k entries of largest |pre-activation| with their signs (``abstopk``), ``"relu"`` ReLU
with an L1 penalty (``standard``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float
from sae_lens import SAE, AbsTopKSAEConfig, StandardSAEConfig, TopKSAEConfig
from sae_lens.saes.abstopk_sae import AbsTopK
from torch import Tensor
from tqdm.auto import tqdm

from itda_lens.activations import CachedActivations, set_metadata, summarise_activations
from itda_lens.training import TrainedSAE, shuffled_batches


@dataclass
class DecoderStats:
    """Sufficient statistics of the decoder least squares, accumulated batch by batch."""

    zz: Float[Tensor, "d_sae d_sae"]
    zx: Float[Tensor, "d_sae d_in"]
    z_sum: Float[Tensor, " d_sae"]
    x_sum: Float[Tensor, " d_in"]
    x_sq: float = 0.0
    count: int = 0

    @classmethod
    def empty(
        cls,
        d_sae: int,
        d_in: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> DecoderStats:
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        return cls(
            torch.zeros(d_sae, d_sae, **kw),
            torch.zeros(d_sae, d_in, **kw),
            torch.zeros(d_sae, **kw),
            torch.zeros(d_in, **kw),
        )

    def add(self, z: Float[Tensor, "b d_sae"], x: Float[Tensor, "b d_in"]) -> None:
        if z.ndim != 2 or x.ndim != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(
                f"need codes [b, d_sae] and inputs [b, d_in], got {z.shape}, {x.shape}"
            )
        if z.shape[1] != self.zz.shape[0] or x.shape[1] != self.zx.shape[1]:
            raise ValueError(
                f"stats are for d_sae={self.zz.shape[0]}, d_in={self.zx.shape[1]}; "
                f"got codes {tuple(z.shape)} and inputs {tuple(x.shape)}"
            )
        z, x = z.to(self.zz.dtype), x.to(self.zz.dtype)
        self.zz += z.T @ z
        self.zx += z.T @ x
        self.z_sum += z.sum(0)
        self.x_sum += x.sum(0)
        self.x_sq += float((x * x).sum())
        self.count += z.shape[0]

    def sse(self, W_dec: Float[Tensor, "d_sae d_in"], b_dec: Float[Tensor, " d_in"]) -> float:
        """``Σ‖z W_dec + b_dec − x‖²`` over everything added, from the statistics alone."""
        W, b = W_dec.to(self.zz.dtype), b_dec.to(self.zz.dtype)
        return float(
            self.x_sq
            + (W * (self.zz @ W)).sum()
            + self.count * (b @ b)
            - 2 * (W * self.zx).sum()
            - 2 * (b @ self.x_sum)
            + 2 * (self.z_sum @ W) @ b
        )


def solve_decoder(
    stats: DecoderStats,
    W_prev: Float[Tensor, "d_sae d_in"],
    b_prev: Float[Tensor, " d_in"],
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    mu: float = 0.0,
    nu: float = 0.0,
) -> tuple[Float[Tensor, "d_sae d_in"], Float[Tensor, " d_in"]]:
    """Exact minimiser over ``(W_dec, b_dec)`` of
    ``Σ‖z W + b − x‖² + α‖W‖² + β‖b‖² + μ‖W − W_prev‖² + ν‖b − b_prev‖²``.

    Normal equations (sae_lens layout, ``W`` is ``[d_sae, d_in]``): with ``s = N/(N+β+ν)``,
    ``A = (α+μ)I + Σzzᵀ − N s z̄z̄ᵀ``, ``Cᵀ = μW_prev + Σzxᵀ − s z̄(N x̄ + ν b_prev)ᵀ``,
    ``W = A⁻¹Cᵀ``, ``b = ν/(N+β+ν) b_prev + s (x̄ − Wᵀz̄)``. Solved by Cholesky in the stats' dtype.
    """
    for name, value in {"alpha": alpha, "beta": beta, "mu": mu, "nu": nu}.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    n = stats.count
    if n == 0:
        raise ValueError("no data: add codes and inputs to the DecoderStats before solving")
    dt = stats.zz.dtype
    W_prev, b_prev = W_prev.to(dt), b_prev.to(dt)
    denom = n + beta + nu
    s = n / denom
    z_bar, x_bar = stats.z_sum / n, stats.x_sum / n
    A = stats.zz - (n * s) * torch.outer(z_bar, z_bar)
    A.diagonal().add_(alpha + mu)
    Ct = mu * W_prev + stats.zx - s * torch.outer(z_bar, n * x_bar + nu * b_prev)
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(
            "decoder system is singular (latents that never fire, or constant codes, with "
            "alpha = mu = 0); use alpha > 0 or mu > 0"
        )
    W = torch.cholesky_solve(Ct, chol)
    b = (nu / denom) * b_prev + s * (x_bar - z_bar @ W)
    return W, b


Activation = Literal["topk", "abstopk", "relu"]
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)


def resolve_activation(
    k: int | None, activation: Activation | None
) -> tuple[Activation, int | None]:
    """``(activation, k)`` made consistent: ``None`` means TopK if ``k`` is set, else ReLU (the
    original convention); ``"relu"`` drops ``k``; the top-k activations need one."""
    if activation is None:
        activation = "relu" if k is None else "topk"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if activation == "relu":
        return activation, None
    if k is None:
        raise ValueError(f"activation={activation!r} needs k")
    return activation, k


@dataclass
class PAMSettings:
    """PAM-SGD settings. ``activation``: ``"topk"`` (top-k then ReLU), ``"abstopk"`` (signed top-k
    by magnitude) or ``"relu"`` (L1 penalty, ``k`` ignored); left ``None`` it is TopK when ``k`` is
    set and ReLU for ``k=None``, so ``PAMSettings(d_sae=..., k=16)`` is TopK as before.

    Inputs are scaled to mean norm ``sqrt(d_in)`` while training (the scale is folded into the
    saved SAE), and the decoder terms ``alpha, beta, mu_dec, nu_dec`` are absolute in those units,
    as in the paper: a fixed ridge acts as a prior whose weight fades as N grows. ``alpha`` matters at
    small N: with 1k activations and 1k latents an almost-unregularised exact solve overfits badly
    (validation FVU 1.16 at ``alpha=0.1``, 0.28 at ``alpha=64``; see benchmarks/README.md).
    """

    d_sae: int | None = None
    """Latents (default 8 x d_in)."""
    k: int | None = 32
    """L0 of the TopK / AbsTopK codes (None: ReLU with an L1 penalty)."""
    epochs: int = 10
    """Passes over the activations (one exact decoder solve each)."""
    batch_size: int = 256
    """Activations per Adam step of the encoder."""
    lr: float = 1e-3
    """Adam learning rate."""
    mu_enc: float = 1e-3
    """Encoder stay-close term (proximal weight on the previous encoder)."""
    nu_enc: float = 1e-3
    """Encoder bias stay-close term."""
    alpha: float = 64.0
    """Decoder ridge (absolute, in units where activations have mean norm sqrt(d))."""
    beta: float = 0.0
    """Decoder-bias ridge."""
    mu_dec: float = 0.0
    """Decoder stay-close term."""
    nu_dec: float = 0.0
    """Decoder-bias stay-close term."""
    l1_coefficient: float = 1e-3
    """L1 penalty of ReLU codes."""
    grad_clip: float = 1.0
    """Gradient-norm clip of the Adam steps."""
    decoder: Literal["pam", "adam"] = "pam"
    """'pam': exact decoder solve each epoch; 'adam': plain Adam on the decoder too (the ablation)."""
    seed: int = 0
    """Seed of the initialisation and the shuffling."""
    chunk_size: int = 8192
    """Activations per chunk when streaming statistics."""
    activation: Activation | None = None
    """'topk' (top-k then ReLU), 'abstopk' (signed top-k) or 'relu'; default from k."""

    def __post_init__(self) -> None:
        self.activation, self.k = resolve_activation(self.k, self.activation)
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {self.d_sae}")
        if self.k is not None and not 1 <= self.k <= (self.d_sae or self.k):
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.epochs < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("epochs, batch_size and chunk_size must be >= 1")
        if self.decoder not in ("pam", "adam"):
            raise ValueError(f"decoder must be 'pam' or 'adam', got {self.decoder!r}")
        for name in (
            "lr",
            "mu_enc",
            "nu_enc",
            "alpha",
            "beta",
            "mu_dec",
            "nu_dec",
            "l1_coefficient",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.decoder == "pam" and self.alpha == 0 and self.mu_dec == 0:
            raise ValueError(
                "PAM needs alpha > 0 or mu_dec > 0: dead latents make the solve singular"
            )

    @property
    def architecture(self) -> Literal["topk", "abstopk", "standard"]:
        """The sae_lens architecture of the saved SAE."""
        if self.activation == "relu":
            return "standard"
        return "abstopk" if self.activation == "abstopk" else "topk"


@dataclass
class PAMResult(TrainedSAE):
    """The trained SAE plus its training squared error per sample (in the scaled units it was
    trained in): after each decoder solve for PAM, after each epoch for Adam."""

    history: list[float] = field(default_factory=list)


def activation_fn(activation: Activation | None, k: int | None) -> Callable[[Tensor], Tensor]:
    """ρ as the saved sae_lens SAE applies it: TopK (top-k, then ReLU), AbsTopK (sae_lens's own
    module: top-k by magnitude, signs kept) or ReLU."""
    activation, k = resolve_activation(k, activation)
    if activation == "relu":
        return torch.relu
    assert k is not None
    if activation == "abstopk":
        return AbsTopK(k)

    def topk(pre: Tensor) -> Tensor:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    return topk


def _codes(
    x: Float[Tensor, "b d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    rho: Callable[[Tensor], Tensor],
) -> Float[Tensor, "b d_sae"]:
    """The encoder half: ``ρ(x W_enc + b_enc)`` (the same expression as the sae_lens encode)."""
    return rho(x @ W_enc + b_enc)


def _stats(
    acts: Tensor,
    rho: Callable[[Tensor], Tensor],
    W_enc: Tensor,
    b_enc: Tensor,
    chunk: int,
    scale: float,
) -> DecoderStats:
    stats = DecoderStats.empty(W_enc.shape[1], acts.shape[1], device=W_enc.device)
    with torch.no_grad():
        for start in range(0, acts.shape[0], chunk):
            x = acts[start : start + chunk].to(W_enc.device, W_enc.dtype) * scale
            stats.add(_codes(x, W_enc, b_enc, rho), x)
    return stats


def train_pam(
    cached: CachedActivations,
    settings: PAMSettings,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PAMResult:
    """Train a TopK/AbsTopK/ReLU SAE with PAM-SGD (or, ``decoder="adam"``, plain Adam) on cached
    activations, using ``settings.activation`` for the codes everywhere (solves and Adam steps).

    Per epoch: exact decoder solve on all N activations, then one shuffled pass of Adam steps on
    the encoder with the stay-close terms; a final solve matches the decoder to the last encoder.
    Returns a sae_lens ``topk`` / ``abstopk`` / ``standard`` SAE, round-tripped through
    ``SAE.load_from_disk``.
    """
    acts = cached.acts
    summary = summarise_activations(acts, settings.chunk_size)
    n, d_in = acts.shape
    st = settings if settings.d_sae is not None else replace(settings, d_sae=8 * d_in)
    assert st.d_sae is not None
    rho = activation_fn(st.activation, st.k)
    if n < st.batch_size:
        raise ValueError(f"need at least batch_size={st.batch_size} activations, got {n}")
    if summary.mean_norm == 0:
        raise ValueError("all activations are zero")
    scale = math.sqrt(d_in) / summary.mean_norm

    g = torch.Generator().manual_seed(st.seed)
    W_dec = torch.randn(st.d_sae, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(device)
    W_enc = W_dec.T.clone().requires_grad_(True)
    b_enc = torch.zeros(st.d_sae, device=device, requires_grad=True)
    b_dec = (summary.mean * scale).float().to(device)
    params = [W_enc, b_enc]
    if st.decoder == "adam":
        W_dec.requires_grad_(True)
        b_dec.requires_grad_(True)
        params += [W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=st.lr)
    history: list[float] = []

    def solve() -> None:
        nonlocal W_dec, b_dec
        stats = _stats(acts, rho, W_enc.detach(), b_enc.detach(), st.chunk_size, scale)
        W, b = solve_decoder(
            stats,
            W_dec,
            b_dec,
            alpha=st.alpha,
            beta=st.beta,
            mu=st.mu_dec,
            nu=st.nu_dec,
        )
        W_dec, b_dec = W.float(), b.float()
        history.append(stats.sse(W, b) / n)

    batches = shuffled_batches(acts, st.batch_size, st.seed)
    steps_per_epoch = n // st.batch_size
    t0 = time.perf_counter()
    bar = tqdm(
        total=st.epochs * steps_per_epoch,
        desc=f"{st.decoder} {st.architecture}",
        disable=not progress,
    )
    for _ in range(st.epochs):
        if st.decoder == "pam":
            solve()
        anchor_W, anchor_b = W_enc.detach().clone(), b_enc.detach().clone()
        for _ in range(steps_per_epoch):
            x = next(batches).to(device) * scale
            z = _codes(x, W_enc, b_enc, rho)
            loss = ((z @ W_dec + b_dec - x) ** 2).mean()
            if st.activation == "relu":
                loss = loss + st.l1_coefficient * (z * W_dec.detach().norm(dim=1)).sum(-1).mean()
            loss = (
                loss
                + st.mu_enc * ((W_enc - anchor_W) ** 2).sum()
                + st.nu_enc * ((b_enc - anchor_b) ** 2).sum()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
            opt.step()
            bar.update()
        bar.set_postfix(loss=float(loss.detach()))
        if st.decoder == "adam":
            stats = _stats(acts, rho, W_enc.detach(), b_enc.detach(), st.chunk_size, scale)
            history.append(stats.sse(W_dec.detach(), b_dec.detach()) / n)
    bar.close()
    if st.decoder == "pam":
        solve()
    seconds = time.perf_counter() - t0
    sae = to_sae_lens(
        W_enc.detach() * scale,
        b_enc.detach(),
        W_dec.detach() / scale,
        b_dec.detach() / scale,
        k=st.k,
        activation=st.activation,
        metadata=cached.usage_metadata(model_name),
        device=device,
    )
    return PAMResult(sae, seconds, st.epochs * steps_per_epoch * st.batch_size, history)


def to_sae_lens(
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    b_dec: Float[Tensor, " d_in"],
    *,
    k: int | None,
    activation: Activation | None = None,
    metadata: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> SAE[Any]:
    """A sae_lens ``topk`` / ``abstopk`` / ``standard`` SAE (``activation`` and ``k`` as in
    ``PAMSettings``) with these weights, loaded back from disk (so what is returned is exactly what
    ``SAE.load_from_disk`` gives users)."""
    activation, k = resolve_activation(k, activation)
    d_in, d_sae = W_enc.shape
    common: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "device": str(device),
    }
    cfg: StandardSAEConfig | TopKSAEConfig
    if activation == "relu":
        cfg = StandardSAEConfig(**common)
    else:
        cfg_cls = AbsTopKSAEConfig if activation == "abstopk" else TopKSAEConfig
        cfg = cfg_cls(k=k, **common)
    set_metadata(cfg, metadata or {})
    sae = SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        for name, value in {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}.items():
            getattr(sae, name).copy_(value.to(getattr(sae, name).dtype))
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        return SAE.load_from_disk(tmp, device=str(device))


def fit_pam(
    cached: CachedActivations,
    settings: PAMSettings,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
) -> SAE[Any]:
    """:func:`train_pam`'s SAE (the ``itda-lens train pam`` entry point)."""
    return train_pam(cached, settings, model_name=model_name, device=device).sae
