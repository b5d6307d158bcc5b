"""Static atom dashboards for any sae_lens SAE, ITDA or transcoder: an index of all latents and a
panel per latent (provenance, top and lower contexts, histogram, logit effects, co-firing), written
as a self-contained site that opens from disk (:func:`write_dashboard`, ``itda-lens dashboard``).
A transcoder's latents are read at its input hook; its logit effects are its output atoms'."""

from itda_lens.dashboard.site import collect, logit_effects, sparse_codes, write_dashboard
from itda_lens.dashboard.stats import LatentStats

__all__ = ["LatentStats", "collect", "logit_effects", "sparse_codes", "write_dashboard"]
