"""What users name on the command line: a model and its token data.

A model is a zoo name (the default), a model folder, a TransformerLens pretrained name (which needs
the Hugging Face hub), or ``hf:NAME_OR_DIR``: a Hugging Face causal LM read at module paths
(:class:`~itda_lens.sources.ModuleSource`). Data is the zoo corpus (``kjv[:SPLIT][:VARIANT]``, e.g. ``kjv``, the default, or ``kjv:heldout:planted``), a token file
(``.pt`` / ``.npy`` holding ``[n_seq, seq_len]`` ids), a folder written by ``datasets.save_to_disk``,
or a hub dataset name (streamed, as a user with internet expects).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from sae_lens import HookedSAETransformer

from itda_lens import zoo
from itda_lens.models import load_model_folder
from itda_lens.sources import ModuleSource, load_hf


def model_card(spec: str) -> dict[str, Any]:
    """The card of a zoo model or of a model folder that has one; ``{}`` for any other model."""
    if spec in zoo.list_models(include_checkpoints=True):
        return zoo.model_card(spec)
    card = Path(spec) / "card.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def resolve_model(
    spec: str | None,
    device: str = "cpu",
    *,
    max_cpu_memory: str | None = None,
    offload_folder: str | None = None,
) -> HookedSAETransformer | ModuleSource:
    """The model a CLI ``--model`` names; ``max_cpu_memory`` / ``offload_folder`` load an
    ``hf:`` model with accelerate's disk offload."""
    spec = spec or zoo.DEFAULT_MODEL
    offload = max_cpu_memory is not None or offload_folder is not None
    if offload and not spec.startswith("hf:"):
        raise ValueError(
            f"--max-cpu-memory / --offload-folder apply to hf: models (accelerate), not {spec!r}"
        )
    if spec.startswith("hf:"):
        if offload:
            if max_cpu_memory is None or offload_folder is None:
                raise ValueError("disk offload needs both --max-cpu-memory and --offload-folder")
            return load_hf(
                spec.removeprefix("hf:"),
                device,
                device_map="auto",
                max_memory={
                    "cpu": int(max_cpu_memory) if max_cpu_memory.isdigit() else max_cpu_memory
                },
                offload_folder=offload_folder,
            )
        return load_hf(spec.removeprefix("hf:"), device)
    if spec in zoo.list_models(include_checkpoints=True):
        return zoo.load_model(spec, device)
    folder = Path(spec)
    if folder.is_dir():
        card = model_card(spec)
        tokenizer = (
            zoo.load_tokenizer(card["tokenizer"])
            if card.get("tokenizer") in zoo.list_tokenizers()
            else None
        )
        return load_model_folder(folder, device, tokenizer=tokenizer)
    if spec.startswith("kjv-"):
        raise ValueError(
            f"unknown zoo model {spec!r}; available: {zoo.list_models(include_checkpoints=True)}"
        )
    try:
        return HookedSAETransformer.from_pretrained(spec, device=device)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"cannot load model {spec!r}: it is not a zoo model {zoo.list_models()}, not a model folder, "
            f"and TransformerLens could not load it ({str(err)[:200]})"
        ) from err


def resolve_tokens(
    spec: str | None, model: Any, *, split: str = "train", context_size: int | None = None
) -> tuple[Any, str]:
    """The token input for ``spec`` and the ``dataset_path`` to record for it."""
    spec = spec or "kjv"
    zoo_data = zoo.parse_data_spec(spec)
    if zoo_data is not None:
        split, variant = zoo_data
        canonical = f"kjv:{split}" + (f":{variant}" if variant else "")
        name = zoo.tokenizer_name(getattr(model, "tokenizer", None))
        if name is not None:
            tokens = zoo.load_tokens(
                split, seq_len=context_size or 128, tokenizer=name, variant=variant
            )
            return tokens, canonical
        # another model's tokenizer: pack the text
        texts = [d.text for d in zoo.documents(split, variant)]
        return datasets.Dataset.from_dict({"text": texts}), canonical
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path)), spec
        if path.suffix == ".pt":
            return torch.load(path, weights_only=True), spec
        raise ValueError(
            f"unsupported token file {path}: use .pt or .npy holding [n_seq, seq_len] ids"
        )
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), spec
    return datasets.load_dataset(spec, split=split, streaming=True), spec


def output_folder(path: str | Path, overwrite: bool, *, clear: bool = False) -> Path:
    """``path`` as an output folder: refused when it is a non-empty folder and ``overwrite`` is not
    set (the message says how to proceed); with ``clear`` its old contents are removed."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} already exists and is not empty; pass --overwrite (overwrite=True) "
                "or choose another output folder"
            )
        if clear:
            shutil.rmtree(out)
    return out


def build_stream(sae: Any, model: Any, data: str | None = None) -> Any:
    """The tokens a saved SAE was built on, read the way it was (its metadata's ``dataset_path``
    at its context size), or the ``data`` spec given instead; None when neither names any."""
    meta = sae.cfg.metadata
    spec = data or meta.dataset_path
    if not spec:
        return None
    return resolve_tokens(spec, model, context_size=meta.context_size or None)[0]
