"""Child processes of tests/test_reliability.py: builds, saves and size-limited writes that the
test kills (SIGKILL) or limits, reporting their progress through a pipe.

The children are forked from a multiprocessing forkserver that imported this module once, so each
starts in well under a second instead of re-importing torch, transformer_lens and sae_lens. Every
child uses the same torch thread count as the test process (tests/conftest.py), so its arithmetic,
and hence a checkpoint it writes, is bit-identical to the test process's.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import torch

import itda_lens  # noqa: F401  (registers the architectures)
import itda_lens.builder.checkpoint as checkpoint_module
import itda_lens.saes.itda as itda_module
from itda_lens import ITDA, build_itda, build_itda_from_activations, zoo
from itda_lens.builder.checkpoint import keep_build_lock

THREADS = 2  # as tests/conftest.py
HOOK = "blocks.1.hook_resid_post"
Conn = multiprocessing.connection.Connection


def context() -> ForkServerContext:
    """The forkserver context whose server has this module (and so torch and itda_lens) loaded."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _child(conn: Conn, work: Callable[[], Any]) -> None:
    """Run ``work`` in the child, reporting ("done", result) or ("error", type, message)."""
    torch.set_num_threads(THREADS)
    try:
        conn.send(("done", work()))
    except Exception as err:
        conn.send(("error", type(err).__name__, str(err), traceback.format_exc()))
        raise SystemExit(1) from err


def _reporting(conn: Conn, batches: list[Any], gate: Path | None = None) -> Iterator[Any]:
    """Yield ``batches``, sending ("batch", i) as batch i is requested: by then every earlier
    batch has been built and (checkpoint_every=1) checkpointed. With ``gate``, wait before batch 2
    until that file exists (the test holds the build there while it tries a second one)."""
    for i, b in enumerate(batches):
        conn.send(("batch", i, time.perf_counter()))
        if gate is not None and i == 2:
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        yield b


def _pause_in_checkpoint_write(conn: Conn, at_save: int) -> None:
    """Make the ``at_save``-th checkpoint save stop (for the kill) after its temporary file is
    written and before it is renamed into place."""
    real = checkpoint_module.save_file
    count = [0]

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        count[0] += 1
        if count[0] == at_save:
            conn.send(("paused", filename))
            time.sleep(60)

    checkpoint_module.save_file = save_file  # type: ignore[assignment]


def token_build(
    conn: Conn,
    tokens: torch.Tensor,
    build_kw: dict[str, Any],
    checkpoint_dir: Path,
    *,
    gate: Path | None = None,
    pause_at_checkpoint: int | None = None,
    out: Path | None = None,
) -> None:
    """A zoo-model build over ``tokens`` split into batches, checkpointing into
    ``checkpoint_dir``; with ``out``, saved there under the kept build lock (as the CLI does)."""

    def work() -> int:
        if pause_at_checkpoint is not None:
            _pause_in_checkpoint_write(conn, pause_at_checkpoint)
        model = zoo.load_model()
        batches = list(tokens.split(build_kw["batch_size"]))
        with keep_build_lock(checkpoint_dir):
            itda = build_itda(
                model,
                _reporting(conn, batches, gate),
                HOOK,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=1,
                progress=False,
                **build_kw,
            )[HOOK]
            if out is not None:
                itda.save_model(out)
        return itda.cfg.d_sae

    _child(conn, work)


def random_itda(seed: int, n_atoms: int, d_in: int = 256) -> ITDA:
    """A deterministic ITDA (the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    return ITDA.from_atoms(
        torch.randn(n_atoms, d_in, generator=g),
        k=4 + seed,
        labels=torch.randint(0, 10**6, (n_atoms, 2), generator=g),
        token_ids=torch.randint(0, 50_000, (n_atoms,), generator=g),
        hook_name=HOOK,
    )


def save_loop(
    conn: Conn, folder: Path, sizes: tuple[int, int], pause_before_cfg_of_save: int | None = None
) -> None:
    """Save ITDA 0 and ITDA 1 (``random_itda(i, sizes[i])``) into ``folder`` alternately, forever,
    sending ("saved", n) after each; optionally stop the given save between its two writes."""
    itdas = [random_itda(i, n) for i, n in enumerate(sizes)]
    if pause_before_cfg_of_save is not None:
        real = itda_module.atomic_write
        count = [0]

        def atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
            count[0] += 1
            if count[0] == 2 * pause_before_cfg_of_save:  # that save's second write: cfg.json
                conn.send(("paused", str(target)))
                time.sleep(60)
            real(target, write)

        itda_module.atomic_write = atomic_write  # type: ignore[assignment]

    def work() -> None:
        n = 0
        while True:
            itdas[n % 2].save_model(folder)
            n += 1
            conn.send(("saved", n, time.perf_counter()))

    _child(conn, work)


def limited_write(conn: Conn, limit: int, kind: str, folder: Path, data: Any) -> None:
    """Write under RLIMIT_FSIZE (SIGXFSZ ignored, so an over-long write raises OSError).

    ``kind="save"``: ``data`` is ``(seed, n_atoms, padding)``: ``random_itda(seed, n_atoms)`` with
    ``padding`` characters of metadata, saved into ``folder`` with a limit of ``limit`` bytes.
    ``kind="checkpoint"``: ``data`` are activation batches built with checkpoints in ``folder``;
    once two checkpoints are written the limit is set to the checkpoint's size plus ``limit``
    bytes, which the next (larger) checkpoint exceeds."""

    def set_limit(limit: int) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def batches() -> Iterator[torch.Tensor]:
        for i, b in enumerate(data):
            if i == 2:
                size = os.path.getsize(folder / checkpoint_module.CHECKPOINT_FILE)
                set_limit(size + limit)
                conn.send(("limited", size))
            yield b

    def work() -> Any:
        if kind == "save":
            seed, n_atoms, padding = data
            itda = random_itda(seed, n_atoms)
            itda.cfg.metadata.note = "x" * padding
            set_limit(limit)
            itda.save_model(folder)
            return None
        itda = build_itda_from_activations(
            batches(),
            checkpoint_dir=folder,
            checkpoint_every=1,
            progress=False,
            k=4,
            cos_threshold=0.9,
        )
        return itda.cfg.d_sae

    _child(conn, work)


def noop() -> None:
    """Started once so that the forkserver is up before the first timed child."""
