"""Build checkpoints: one safetensors file per build (every hook's dictionary and the progress
record), written atomically, so a build killed at any moment resumes from its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.rule import ITDABuilder
from itda_lens.dictionary import AtomStore
from itda_lens.saes import atomic_write

CHECKPOINT_FILE = "itda_checkpoint.safetensors"
VERSION = 2


class Checkpointer:
    """Saves and loads ``itda_checkpoint.safetensors`` in ``folder`` (no-op without a folder)."""

    def __init__(self, folder: str | Path | None):
        self.path = Path(folder) / CHECKPOINT_FILE if folder is not None else None

    def load(
        self, resume: bool, cfg: BuildConfig, device: Any
    ) -> tuple[dict[str, Any], dict[str, ITDABuilder]] | None:
        """The saved (progress fields, builders), None if there is nothing to resume."""
        if self.path is None:
            if resume:
                raise ValueError("resume=True needs checkpoint_dir")
            return None
        if not self.path.exists():
            return None
        if not resume:
            raise FileExistsError(
                f"{self.path} already holds a build checkpoint; pass resume=True to continue it, "
                "or use another checkpoint_dir"
            )
        try:
            with safe_open(str(self.path), framework="pt") as f:
                state = json.loads(f.metadata()["state"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise ValueError(f"corrupt build checkpoint {self.path}: {err}") from err
        if state.get("version") != VERSION:
            raise ValueError(
                f"{self.path} was written by an incompatible itda_lens version "
                f"(checkpoint version {state.get('version')}, this one reads {VERSION}); "
                "start the build again in an empty folder"
            )
        builders = {
            hook: _restore(h, tensors, cfg, device) for hook, h in state.pop("hooks").items()
        }
        state.pop("version")
        return state, builders

    def save(self, progress: dict[str, Any], builders: dict[str, ITDABuilder]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        hooks = {}
        for i, (hook, b) in enumerate(builders.items()):
            tensors[f"{i}.atoms"] = b.store.atoms.contiguous().cpu()
            tensors[f"{i}.labels"] = b.store.labels.contiguous().cpu()
            tensors[f"{i}.token_ids"] = b.store.token_ids.contiguous().cpu()
            hooks[hook] = {
                "index": i,
                "d_in": b.d_in,
                "blocks": b.store.blocks,
                "tokens_seen": b.tokens_seen,
                "tokens_scored": b.tokens_scored,
                "n_batches": b.n_batches,
                "added_at": b.added_at,
                "stop_reason": b.stop_reason,
                "sub": b._sub,
                "seconds": b.seconds,
            }
        meta = {"state": json.dumps({**progress, "version": VERSION, "hooks": hooks})}
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _restore(
    h: dict[str, Any], tensors: dict[str, Tensor], cfg: BuildConfig, device: Any
) -> ITDABuilder:
    b = ITDABuilder(h["d_in"], cfg, device=device)
    i = h["index"]
    b.store = AtomStore.restore(
        tensors[f"{i}.atoms"],
        tensors[f"{i}.labels"],
        tensors[f"{i}.token_ids"],
        h["blocks"],
        device=device,
        dtype=cfg.torch_decision_dtype,
    )
    b.tokens_seen, b.tokens_scored, b.n_batches = (
        h["tokens_seen"],
        h["tokens_scored"],
        h["n_batches"],
    )
    b.added_at, b.stop_reason, b._sub, b.seconds = (
        h["added_at"],
        h["stop_reason"],
        h["sub"],
        h["seconds"],
    )
    return b
