"""k-means and k-means + local-PCA autoencoders (SplInterp's baselines) as sae_lens SAEs.

Both are "cluster SAEs": latents come in blocks of ``1 + m`` per cluster — an indicator whose
decoder row is the cluster mean ``μ_c`` and ``m`` coefficients whose rows are the cluster's top
principal directions ``U_c``. The encoder is affine, ``pre = x W_enc + b_enc`` with indicator
columns ``2ν_c, −‖ν_c‖²`` (so ``argmax`` = nearest centroid ``ν_c``, a Voronoi cell) and coefficient
columns ``U_c, −U_cᵀμ_c``; the activation keeps only the winning cluster's block, indicator set to 1.
So ``x̂ = μ_c + U_c U_cᵀ(x − μ_c)``: piecewise constant for k-means (``m = 0``, architecture
"kmeans"), piecewise affine for local PCA (architecture "kmeans_pca", the accuracy reference:
by Eckart–Young the best rank-m affine piece per region, but nothing shared between regions).
The centroid ``ν_c`` is the one the points were assigned with, the mean ``μ_c`` that of the points
the PCA was then fitted on: equal for k-means and once Lloyd has converged, and kept apart so the
encoder's regions are the ones the local PCA was fitted on.
Fitting them is :mod:`itda_lens.splinterp.kmeans`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, SAEConfig
from torch import Tensor, nn
from typing_extensions import override


@dataclass
class _ClusterSAEConfig(SAEConfig):
    """What the cluster SAEs share: no decoder bias, raw activations, latents in blocks of ``block``
    per cluster (indicator first)."""

    apply_b_dec_to_input: bool = False

    @property
    def block(self) -> int:
        return 1

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.apply_b_dec_to_input:
            raise ValueError(
                "cluster SAEs have no decoder bias: apply_b_dec_to_input must be False"
            )
        if self.normalize_activations != "none":
            raise ValueError(
                "cluster SAEs work on raw activations: normalize_activations must be 'none'"
            )


@dataclass
class KMeansSAEConfig(_ClusterSAEConfig):
    """A k-means autoencoder: ``d_sae`` centroids; code = one-hot nearest centroid.

    ``gain=True`` makes the code the least-squares scale ``⟨x, μ_c⟩/‖μ_c‖²`` instead of 1 (an
    L0 = 1 baseline comparable with Top-1 SAEs and ITDA at k = 1).
    """

    gain: bool = False

    @override
    @classmethod
    def architecture(cls) -> str:
        return "kmeans"


@dataclass
class LocalPCASAEConfig(_ClusterSAEConfig):
    """k-means + local PCA: ``d_sae = n_clusters · (1 + n_components)`` latents in cluster blocks.

    ``assignment="centroid"``: regions are k-means (Voronoi) cells; ``"flat"``: each input goes to
    the cluster whose affine m-flat is nearest (k-flats / VQPCA), which reconstructs better.
    """

    n_components: int = 4
    assignment: Literal["centroid", "flat"] = "centroid"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "kmeans_pca"

    @property
    @override
    def block(self) -> int:
        return 1 + self.n_components

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_components < 0 or self.n_components > self.d_in:
            raise ValueError(
                f"n_components must be in [0, d_in={self.d_in}], got {self.n_components}"
            )
        if self.assignment not in ("centroid", "flat"):
            raise ValueError(f"assignment must be 'centroid' or 'flat', got {self.assignment!r}")
        if self.d_sae % self.block:
            raise ValueError(
                f"d_sae={self.d_sae} is not a multiple of 1 + n_components = {self.block}"
            )


class _ClusterSAE(SAE[_ClusterSAEConfig]):
    """Shared encode/decode of the cluster SAEs (see the module docstring)."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.W_enc = nn.Parameter(torch.zeros(self.cfg.d_in, self.cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))

    @property
    def n_clusters(self) -> int:
        return self.cfg.d_sae // self.cfg.block

    def assign(self, pre: Float[Tensor, "... d_sae"]) -> Int[Tensor, "..."]:
        """Winning cluster per input from the pre-activations."""
        blocks = pre.unflatten(-1, (self.n_clusters, self.cfg.block))
        score = blocks[..., 0]
        if getattr(self.cfg, "assignment", "centroid") == "flat":
            score = score + (blocks[..., 1:] ** 2).sum(-1)
        return score.argmax(-1)

    @override
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        sae_in = self.process_sae_in(x)
        pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        c = self.assign(pre)
        blocks = pre.unflatten(-1, (self.n_clusters, self.cfg.block))
        win = blocks.gather(-2, c[..., None, None].expand(*c.shape, 1, self.cfg.block))
        first = torch.ones_like(win[..., :1])
        if getattr(self.cfg, "gain", False):
            mu = self.W_dec[c]  # [..., d_in]
            first = ((sae_in * mu).sum(-1) / (mu * mu).sum(-1).clamp_min(1e-30))[..., None, None]
        win = torch.cat([first, win[..., 1:]], -1)
        out = torch.zeros_like(blocks).scatter(-2, c[..., None, None].expand_as(win), win)
        return self.hook_sae_acts_post(out.flatten(-2))

    @override
    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    @override
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "cluster SAEs' indicator codes are fixed at 1; rescaling latents would change the regions"
        )

    @classmethod
    def _from_parts(
        cls,
        cfg: SAEConfig,
        means: Float[Tensor, "c d"],
        directions: Float[Tensor, "c m d"],
        device: str | torch.device,
        centroids: Float[Tensor, "c d"] | None = None,
    ) -> Any:
        """Assemble weights from cluster means and principal directions (rows).

        ``centroids`` are the Voronoi sites the encoder assigns with (default: the means): the
        centroids a local PCA was fitted on, which differ from the refit means until Lloyd
        converges. Decoder and coefficients use the means. Flat assignment needs the means (the
        flats pass through them).
        """
        if centroids is None:
            centroids = means
        elif getattr(cfg, "assignment", "centroid") == "flat":
            raise ValueError("flat assignment scores flats through the means: pass no centroids")
        c, m, d = directions.shape
        W_dec = torch.cat([means[:, None, :], directions], 1).reshape(c * (1 + m), d)
        w_enc = torch.cat([2 * centroids[:, None, :], directions], 1)  # [c, 1+m, d]
        b_enc = torch.cat(
            [
                -(centroids * centroids).sum(1, keepdim=True),
                -(directions @ means[:, :, None])[..., 0],
            ],
            1,
        )
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec.copy_(W_dec)
            sae.W_enc.copy_(w_enc.reshape(c * (1 + m), d).T)
            sae.b_enc.copy_(b_enc.reshape(-1))
        return sae.to(device)


class KMeansSAE(_ClusterSAE):
    """k-means autoencoder (architecture "kmeans"): x̂ = nearest centroid (times the gain)."""

    def __init__(self, cfg: KMeansSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class LocalPCASAE(_ClusterSAE):
    """k-means + local PCA autoencoder (architecture "kmeans_pca"): x̂ = μ_c + U_c U_cᵀ(x − μ_c)."""

    def __init__(self, cfg: LocalPCASAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
