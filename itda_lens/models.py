"""Model folders: a TransformerLens config, fp16 safetensors weights, an optional tokenizer and card.

This is how the zoo ships its models and how users save config-built models for the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens import HookedSAETransformer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def save_model_folder(
    model: HookedSAETransformer,
    folder: str | Path,
    *,
    fp16: bool = True,
    card: dict[str, Any] | None = None,
    save_tokenizer: bool = True,
) -> Path:
    """Save a config-built model as ``config.json`` + ``model.safetensors`` (+ tokenizer, card)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if _jsonable(v)}
    (folder / MODEL_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    dtype = torch.float16 if fp16 else torch.float32
    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if v.is_floating_point() and not k.endswith("IGNORE")
    }
    save_file(state, str(folder / MODEL_WEIGHTS))
    if save_tokenizer and model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card, indent=2))
    return folder


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def load_model_folder(
    folder: str | Path, device: str = "cpu", tokenizer: Any = None
) -> HookedSAETransformer:
    """Load a folder written by :func:`save_model_folder`, with errors that name the bad file.

    The tokenizer is ``tokenizer`` if given, else the folder's ``tokenizer/`` sub-folder if any.
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / MODEL_CONFIG, folder / MODEL_WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"model folder {folder} is missing {path.name}")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt model config {cfg_path}: {err}") from err
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt or truncated weight file {weights_path}: {err}") from err
    cfg_dict["device"] = device
    cfg = HookedTransformerConfig(
        **{k: v for k, v in cfg_dict.items() if k in HookedTransformerConfig.__dataclass_fields__}
    )
    tok_dir = folder / TOKENIZER_DIR
    if tokenizer is None and tok_dir.is_dir():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    expected = {
        k
        for k, v in model.state_dict().items()
        if v.is_floating_point() and not k.endswith("IGNORE")
    }
    if set(state) != expected:
        raise ValueError(
            f"weight file {weights_path} does not match its config: "
            f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.to(device).eval()
