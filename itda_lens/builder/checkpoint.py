"""Build checkpoints: one safetensors file per build (every hook's dictionary and the progress
record), written atomically, so a build killed at any moment resumes from its last checkpoint.

A build holds its checkpoint folder's lock (:func:`build_lock`, an ``fcntl.flock`` on
``itda_build.lock``) from start to end, so two builds never write one folder: the second fails at
once with :class:`CheckpointLockedError`, naming the process that holds it. The kernel drops the
lock when its holder dies (even by SIGKILL), so a killed build never blocks its resume.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are not locked
    fcntl = None  # type: ignore[assignment]

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from itda_lens.builder.config import BuildConfig
from itda_lens.builder.distributed import Comm
from itda_lens.builder.rule import ITDABuilder
from itda_lens.saes import atomic_write, temporaries

CHECKPOINT_FILE = "itda_checkpoint.safetensors"
LOCK_FILE = "itda_build.lock"
VERSION = 3  # 3: builder state_dict fields (the Gram rows are recomputed on restore)


class CheckpointLockedError(FileExistsError):
    """Another build (another process, or another thread of this one) holds the checkpoint folder."""


#: folders this process holds: resolved path -> [thread, nesting depth, open lock file or None
#: (None: reserved by keep_build_lock, not yet taken)]
_HELD: dict[Path, list[Any]] = {}
_HELD_GUARD = threading.Lock()


@contextmanager
def build_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive build lock of checkpoint folder ``folder`` (created if missing).

    Raises :class:`CheckpointLockedError` at once if another process or thread holds it;
    re-entrant within one thread. On taking it, temporaries that a killed writer left next to the
    checkpoint are removed."""
    with _holding(Path(folder), take=True) as path:
        yield path


@contextmanager
def keep_build_lock(folder: str | Path) -> Iterator[Path]:
    """Keep the lock that a build inside this block takes on ``folder`` until the block ends
    (the CLI saves its ITDAs under it). Fails at once if another build holds it now, but creates
    nothing unless a build inside takes it."""
    folder = Path(folder)
    with _holding(folder, take=False):
        if (folder / LOCK_FILE).is_file() and _HELD[folder.resolve()][2] is None:
            _take(folder, probe=True)  # raises if another build holds it now
        yield folder


@contextmanager
def _holding(folder: Path, take: bool) -> Iterator[Path]:
    key = folder.resolve()  # also for a folder not yet created
    me = threading.get_ident()
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is not None and entry[0] != me:
            raise CheckpointLockedError(
                _locked_message(folder, f"another thread of this process (pid {os.getpid()})")
            )
        if entry is None:
            entry = _HELD[key] = [me, 0, None]
        entry[1] += 1
    try:
        if take and entry[2] is None:
            entry[2] = _take(folder)
        yield folder
    finally:
        with _HELD_GUARD:
            entry[1] -= 1
            done = entry[1] == 0
            if done:
                del _HELD[key]
        if done and entry[2] is not None:
            entry[2].seek(0)
            entry[2].truncate()
            entry[2].close()  # closing drops the flock


def _take(folder: Path, probe: bool = False) -> IO[str] | None:
    """Take the lock (or, with ``probe``, check it is free and let it go at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole build
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise CheckpointLockedError(_locked_message(folder, holder)) from err
        if probe:
            f.close()
            return None
        f.seek(0)
        f.truncate()
        f.write(
            f"pid {os.getpid()} on host {socket.gethostname()} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        f.flush()
        for tmp in temporaries(folder / CHECKPOINT_FILE):
            tmp.unlink(missing_ok=True)
    except BaseException:
        f.close()
        raise
    return f


def locked(folder: str | Path | None, comm: Comm | None = None) -> AbstractContextManager[Any]:
    """:func:`build_lock` on ``folder``, or nothing when there is no checkpoint folder (or on
    the ranks other than 0 of a data-parallel build ``comm``: rank 0 writes for all)."""
    if folder is None or (comm is not None and comm.rank != 0):
        return nullcontext()
    return build_lock(folder)


def _locked_message(folder: Path, holder: str) -> str:
    return (
        f"another build is using the checkpoint folder {folder}: its lock {LOCK_FILE} is held by "
        f"{holder}; wait for that build to finish, or build into another folder "
        "(checkpoint_dir=, or itda-lens build --out)"
    )


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
            state = b.state_dict()
            for name in _TENSORS:
                tensors[f"{i}.{name}"] = state[name]
            hooks[hook] = {"index": i, **state["fields"]}
        meta = {"state": json.dumps({**progress, "version": VERSION, "hooks": hooks})}
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


#: the tensors of a builder's state_dict (the rest is its JSON fields)
_TENSORS = ("atoms", "labels", "token_ids")


def _restore(
    h: dict[str, Any], tensors: dict[str, Tensor], cfg: BuildConfig, device: Any
) -> ITDABuilder:
    b = ITDABuilder(h["d_in"], cfg, device=device)
    i = h["index"]
    b.load_state_dict({**{n: tensors[f"{i}.{n}"] for n in _TENSORS}, "fields": h})
    return b
