"""Test helpers (sae_lens style): small config-built models and reproducible tokens, no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

VOCAB = 200
SEQ = 32
BOS, EOS, PAD = 0, 1, 2


def make_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, n_layers: int = 2
) -> HookedSAETransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=VOCAB,
        n_ctx=SEQ,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        model_name=f"tiny-{seed}",
    )
    return HookedSAETransformer(cfg, tokenizer=tokenizer).eval()


def make_tokens(n_seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, VOCAB, (n_seq, SEQ), generator=g)
    toks[:, 0] = BOS
    return toks


def truncated_save(sae: SAE[Any], folder: Path) -> Path:
    """Save ``sae`` to ``folder`` and cut the last 100 bytes off its weights file (a damaged save)."""
    sae.save_model(folder)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder
