"""The embedded default: small TransformerLens models trained on the King James Bible, shipped in
the package, with their tokenizers and reproducible token batches — so everything runs offline.

>>> from itda_lens import zoo
>>> model = zoo.load_model()                       # the default, kjv-4l128-s0
>>> tokens = zoo.load_tokens("train", n_seq=64)    # [64, 128], reproducible
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
from jaxtyping import Bool, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from itda_lens.models import load_model_folder
from itda_lens.zoo.corpus import (
    HELDOUT_BOOKS,
    PLANTING,
    SPLITS,
    VARIANTS,
    Split,
    documents,
    token_stream,
    window_marks,
    window_order,
    windows,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TOKENIZER",
    "HELDOUT_BOOKS",
    "PLANTING",
    "VARIANTS",
    "as_dataset",
    "documents",
    "list_models",
    "list_tokenizers",
    "load_model",
    "load_token_marks",
    "load_token_spans",
    "load_tokenizer",
    "load_tokens",
    "model_card",
    "parse_data_spec",
    "tokenizer_name",
]

ZOO_DIR = Path(__file__).parent
MODELS_DIR = ZOO_DIR / "models"
TOKENIZERS_DIR = ZOO_DIR / "tokenizers"
DEFAULT_MODEL = "kjv-4l128-s0"
DEFAULT_TOKENIZER = "bpe2048"
CHECKPOINT_SEP = "@"


def list_models(include_checkpoints: bool = False) -> list[str]:
    """Names of the shipped models (``name@stepN`` are intermediate checkpoints of ``name``)."""
    if not MODELS_DIR.is_dir():
        return []
    names = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "card.json").is_file())
    return names if include_checkpoints else [n for n in names if CHECKPOINT_SEP not in n]


def list_tokenizers() -> list[str]:
    return (
        sorted(p.name for p in TOKENIZERS_DIR.iterdir() if (p / "tokenizer.json").is_file())
        if TOKENIZERS_DIR.is_dir()
        else []
    )


def tokenizer_name(tokenizer: Any) -> str | None:
    """The zoo name of a tokenizer loaded from the zoo (None for any other tokenizer)."""
    path = Path(getattr(tokenizer, "name_or_path", "") or "")
    return (
        path.name if path.parent == TOKENIZERS_DIR and (path / "tokenizer.json").is_file() else None
    )


def _model_dir(name: str) -> Path:
    folder = MODELS_DIR / name
    if not (folder / "card.json").is_file():
        raise ValueError(
            f"unknown zoo model {name!r}; available: {list_models(include_checkpoints=True)}"
        )
    return folder


def model_card(name: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The training card: config, seed, tokens seen, train / held-out loss, unigram baseline."""
    return json.loads((_model_dir(name) / "card.json").read_text())


@lru_cache(maxsize=4)
def load_tokenizer(name: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerFast:
    folder = TOKENIZERS_DIR / name
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"unknown zoo tokenizer {name!r}; available: {list_tokenizers()}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu") -> HookedSAETransformer:
    """A zoo model as a ``HookedSAETransformer`` with its tokenizer attached."""
    folder = _model_dir(name)
    card = model_card(name)
    model = load_model_folder(folder, device=device, tokenizer=load_tokenizer(card["tokenizer"]))
    model.cfg.model_name = name
    return model


def parse_data_spec(spec: str) -> tuple[Split, str | None] | None:
    """``kjv[:SPLIT][:VARIANT]`` as (split, variant); None for anything that is not zoo data."""
    parts = spec.split(":")
    if parts[0] != "kjv":
        return None
    split = parts[1] if len(parts) > 1 else "train"
    variant = parts[2] if len(parts) > 2 else None
    if len(parts) == 2 and split in VARIANTS:  # kjv:planted = kjv:train:planted
        split, variant = "train", split
    if len(parts) > 3 or split not in SPLITS or (variant is not None and variant not in VARIANTS):
        raise ValueError(
            f"zoo data is kjv[:SPLIT][:VARIANT] with SPLIT in {SPLITS} and VARIANT in {VARIANTS}; "
            f"got {spec!r}"
        )
    return split, variant  # type: ignore[return-value]


def _selected(
    split: Split,
    n_seq: int | None,
    seq_len: int,
    tokenizer: str,
    shuffle: bool,
    seed: int,
    variant: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token windows, their spans and marks, in the requested order, first ``n_seq`` of them."""
    tok = load_tokenizer(tokenizer)
    stream = token_stream(tok, split, variant)
    toks, spans = windows(stream, seq_len, tok.bos_token_id)
    if n_seq is not None and n_seq > toks.shape[0]:
        raise ValueError(
            f"the {split} split has only {toks.shape[0]} windows of {seq_len} tokens; asked for {n_seq}"
        )
    order = window_order(toks.shape[0], shuffle, seed)[:n_seq]
    return toks[order], spans[order], window_marks(stream, seq_len)[order]


def load_tokens(
    split: Split = "train",
    n_seq: int | None = None,
    seq_len: int = 128,
    *,
    tokenizer: str = DEFAULT_TOKENIZER,
    shuffle: bool = True,
    seed: int = 0,
    variant: str | None = None,
) -> Int[Tensor, "n_seq seq_len"]:
    """Reproducible context windows of a split: ``<bos>`` + ``seq_len - 1`` tokens, in a fixed
    shuffled order (``seed``) or in canonical book order (``shuffle=False``); ``variant`` picks a
    variant of the text (:data:`VARIANTS`)."""
    return _selected(split, n_seq, seq_len, tokenizer, shuffle, seed, variant)[0]


def load_token_spans(
    split: Split = "train",
    n_seq: int | None = None,
    seq_len: int = 128,
    *,
    tokenizer: str = DEFAULT_TOKENIZER,
    shuffle: bool = True,
    seed: int = 0,
    variant: str | None = None,
) -> Int[Tensor, "n_seq seq_len 3"]:
    """Source of every token of :func:`load_tokens`: (document id, char start, char end); BOS is -1."""
    return _selected(split, n_seq, seq_len, tokenizer, shuffle, seed, variant)[1]


def load_token_marks(
    split: Split = "train",
    n_seq: int | None = None,
    seq_len: int = 128,
    *,
    tokenizer: str = DEFAULT_TOKENIZER,
    shuffle: bool = True,
    seed: int = 0,
    variant: str | None = None,
) -> Bool[Tensor, "n_seq seq_len"]:
    """Which tokens of :func:`load_tokens` overlap text the variant inserted (``planted``: the
    trigger and its phrase), i.e. where a model fine-tuned on the variant was taught something."""
    return _selected(split, n_seq, seq_len, tokenizer, shuffle, seed, variant)[2]


def as_dataset(
    split: Split = "train", n_seq: int | None = None, seq_len: int = 128, **kwargs: Any
) -> datasets.Dataset:
    """The same windows as a ``datasets.Dataset`` with a ``tokens`` column (for ActivationsStore)."""
    return datasets.Dataset.from_dict(
        {"tokens": load_tokens(split, n_seq, seq_len, **kwargs).tolist()}
    )
