"""Reliability harness: builds killed with SIGKILL resume to the uninterrupted dictionary, saves
killed mid-write never load as a mix of two saves, two builds cannot share a checkpoint folder,
writes over a file-size limit leave nothing loadable behind, and an ITDA without a hook says so.

The killed and limited processes are forked from a forkserver that preloaded
``tests/_reliability_driver.py`` (see there), so each starts in well under a second.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from safetensors import safe_open

from itda_lens import ITDA, build_itda, build_itda_from_activations, zoo
from itda_lens.builder.checkpoint import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    CheckpointLockedError,
    build_lock,
    keep_build_lock,
)
from itda_lens.cli import main
from itda_lens.evals import evaluate, evaluate_all
from itda_lens.saes import check_itda_folder
from itda_lens.saes._io import temporaries
from tests import _reliability_driver as driver
from tests.helpers import make_tokens

HOOK = driver.HOOK
#: 48 windows of 32 random zoo tokens in batches of 4: 12 batches, a couple of seconds to build
BUILD_KW: dict[str, Any] = {"batch_size": 4, "k": 8, "cos_threshold": 0.7}
N_WINDOWS = 48
N_BATCHES = N_WINDOWS // BUILD_KW["batch_size"]
MIXED = "different saves"


# --- processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx() -> ForkServerContext:
    ctx = driver.context()
    warm = ctx.Process(target=driver.noop)
    warm.start()
    warm.join(120)
    return ctx


class Child:
    """A driver function running in a forked child, its messages read from a pipe."""

    running: ClassVar[list[Child]] = []

    def __init__(self, ctx: ForkServerContext, target: Callable[..., None], *args: Any, **kw: Any):
        self.conn, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=target, args=(send, *args), kwargs=kw, daemon=True)
        self.proc.start()
        send.close()
        self.log: list[tuple[Any, ...]] = []
        Child.running.append(self)

    def recv(self, timeout: float = 60.0) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise AssertionError(f"child sent nothing for {timeout} s; so far: {self.log[-3:]}")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise AssertionError(f"child ended early: {self.log[-3:]}") from None
        self.log.append(msg)
        if msg[0] == "error" and msg[1] not in ("OSError",):
            raise AssertionError(f"child failed: {msg[3]}")
        return msg

    def wait_for(self, kind: str, n: int | None = None, timeout: float = 60.0) -> tuple[Any, ...]:
        while True:
            msg = self.recv(timeout)
            if msg[0] == kind and (n is None or msg[1] >= n):
                return msg
            if msg[0] in ("done", "error"):
                raise AssertionError(f"child finished before {kind} {n}: {msg[:3]}")

    def kill(self) -> None:
        assert self.proc.is_alive(), "the child finished before it could be killed"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)
        assert self.proc.exitcode == -signal.SIGKILL

    def finish(self, timeout: float = 120.0) -> tuple[Any, ...]:
        while True:
            msg = self.recv(timeout)
            if msg[0] in ("done", "error"):
                self.proc.join(30)
                return msg

    def interval(self, kind: str) -> float:
        """Seconds between the child's last two ``kind`` messages (its current pace)."""
        times = [m[2] for m in self.log if m[0] == kind]
        return times[-1] - times[-2]


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    yield
    while Child.running:
        child = Child.running.pop()
        if child.proc.is_alive():  # a test that failed before killing or finishing it
            child.proc.kill()
            child.proc.join(30)
        child.conn.close()


# --- shared data --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_model() -> HookedSAETransformer:
    return zoo.load_model()


@pytest.fixture(scope="module")
def zoo_tokens(zoo_model: HookedSAETransformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, zoo_model.cfg.d_vocab, (N_WINDOWS, 32), generator=g)
    toks[:, 0] = zoo_model.tokenizer.bos_token_id
    return toks


def _batches(tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    return iter(list(tokens.split(BUILD_KW["batch_size"])))


@pytest.fixture(scope="module")
def reference(zoo_model: HookedSAETransformer, zoo_tokens: torch.Tensor) -> ITDA:
    """The uninterrupted build."""
    return build_itda(zoo_model, _batches(zoo_tokens), HOOK, progress=False, **BUILD_KW)[HOOK]


def _checkpoint_state(folder: Path) -> dict[str, Any]:
    with safe_open(str(folder / CHECKPOINT_FILE), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def _assert_same_dictionary(a: ITDA, b: ITDA) -> None:
    assert a.W_dec.dtype == b.W_dec.dtype and a.W_dec.shape == b.W_dec.shape
    assert torch.equal(a.W_dec.view(torch.uint8), b.W_dec.view(torch.uint8)), (
        "W_dec not bitwise equal"
    )
    assert torch.equal(a.atom_labels, b.atom_labels)
    assert torch.equal(a.atom_token_ids, b.atom_token_ids)
    ra, rb = a.build_record, b.build_record
    if ra is not None:
        assert rb is not None and ra.tokens_seen == rb.tokens_seen and ra.stream == rb.stream


# --- A1: a build killed at a random point resumes to the uninterrupted dictionary --------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_build_killed_at_a_random_point_resumes_to_the_same_dictionary(
    seed: int,
    ctx: ForkServerContext,
    zoo_model: HookedSAETransformer,
    zoo_tokens: torch.Tensor,
    reference: ITDA,
    tmp_path: Path,
) -> None:
    rng = random.Random(seed)
    kill_after = rng.randint(3, N_BATCHES - 6)  # batches checkpointed before the kill window
    child = Child(ctx, driver.token_build, zoo_tokens, BUILD_KW, tmp_path)
    child.wait_for("batch", kill_after)  # batch kill_after is starting: earlier ones are on disk
    time.sleep(rng.uniform(0.0, 1.0) * child.interval("batch"))  # anywhere in the next batch
    child.kill()
    state = _checkpoint_state(tmp_path)
    assert not state["finished"] and kill_after <= state["batches"] < N_BATCHES
    assert f"pid {child.proc.pid}" in (tmp_path / LOCK_FILE).read_text()  # the dead holder's
    resumed = build_itda(
        zoo_model,
        _batches(zoo_tokens),
        HOOK,
        checkpoint_dir=tmp_path,
        resume=True,
        checkpoint_every=1,
        progress=False,
        **BUILD_KW,
    )[HOOK]
    _assert_same_dictionary(resumed, reference)


def test_build_killed_inside_a_checkpoint_write_resumes_to_the_same_dictionary(
    ctx: ForkServerContext,
    zoo_model: HookedSAETransformer,
    zoo_tokens: torch.Tensor,
    reference: ITDA,
    tmp_path: Path,
) -> None:
    """Killed with the 5th checkpoint written to its temporary file but not yet renamed."""
    child = Child(ctx, driver.token_build, zoo_tokens, BUILD_KW, tmp_path, pause_at_checkpoint=5)
    _, tmp_name = child.wait_for("paused")
    child.kill()
    assert temporaries(tmp_path / CHECKPOINT_FILE) == [Path(tmp_name)]
    assert _checkpoint_state(tmp_path)["batches"] == 4  # the previous checkpoint, whole
    resumed = build_itda(
        zoo_model,
        _batches(zoo_tokens),
        HOOK,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
        **BUILD_KW,
    )[HOOK]
    _assert_same_dictionary(resumed, reference)
    assert temporaries(tmp_path / CHECKPOINT_FILE) == []  # removed by the resumed build


# --- A2: a save killed mid-write never loads as a mix of two saves -------------------------


SIZES = (3000, 2000)  # two ITDAs of 3 MB and 2 MB, saved alternately


def _outcome(load: Callable[[Path], Any], folder: Path, itdas: list[ITDA]) -> str:
    """Which complete dictionary the folder loads as, or that it was refused as a mixed save."""
    try:
        got = load(folder)
    except ValueError as err:
        assert MIXED in str(err), err
        return "refused"
    for i, want in enumerate(itdas):
        if got.cfg.d_sae == want.cfg.d_sae and got.cfg.k == want.cfg.k:
            _assert_same_dictionary(got, want)
            return f"itda{i}"
    raise AssertionError(f"loaded a dictionary that is neither save: d_sae={got.cfg.d_sae}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_save_killed_at_a_random_point_loads_whole_or_not_at_all(
    seed: int, ctx: ForkServerContext, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    itdas = [driver.random_itda(i, n) for i, n in enumerate(SIZES)]
    child = Child(ctx, driver.save_loop, tmp_path, SIZES)
    child.wait_for("saved", rng.randint(2, 5))
    time.sleep(rng.uniform(0.0, 1.5) * child.interval("saved"))
    child.kill()
    outcomes = {
        _outcome(loader, tmp_path, itdas) for loader in (SAE.load_from_disk, ITDA.load_from_disk)
    }
    assert len(outcomes) == 1 and outcomes <= {"itda0", "itda1", "refused"}, outcomes


def test_save_killed_between_its_two_writes_is_refused(
    ctx: ForkServerContext, tmp_path: Path
) -> None:
    """The second save dies after its weights are in place and before its cfg.json is: the folder
    holds ITDA 1's weights and ITDA 0's cfg.json, which must not load."""
    child = Child(ctx, driver.save_loop, tmp_path, SIZES, pause_before_cfg_of_save=2)
    child.wait_for("paused")
    child.kill()
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as f:
        assert f.get_slice("W_dec").get_shape() == [SIZES[1], 256]  # the new weights
    assert json.loads((tmp_path / "cfg.json").read_text())["d_sae"] == SIZES[0]  # the old cfg
    for load in (SAE.load_from_disk, ITDA.load_from_disk, check_itda_folder):
        with pytest.raises(ValueError, match=MIXED):
            load(tmp_path)


@pytest.mark.parametrize("stale", ["cfg.json", "sae_weights.safetensors"])
def test_files_from_two_saves_of_one_shape_never_load_together(stale: str, tmp_path: Path) -> None:
    """Same d_sae and d_in, so only the save id tells the saves apart."""
    old, new = driver.random_itda(0, 40), driver.random_itda(1, 40)
    old.save_model(tmp_path / "old")
    new.save_model(tmp_path / "new")
    (tmp_path / "new" / stale).write_bytes((tmp_path / "old" / stale).read_bytes())
    for load in (SAE.load_from_disk, ITDA.load_from_disk):
        with pytest.raises(ValueError, match=MIXED):
            load(tmp_path / "new")


# --- A3: two builds into one folder -------------------------------------------------------


def test_second_build_into_a_locked_folder_fails_at_once(
    ctx: ForkServerContext,
    zoo_model: HookedSAETransformer,
    zoo_tokens: torch.Tensor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first build (a child, held before its third batch until the gate file exists) holds
    ``out/checkpoint`` while it builds and saves; every second build into that folder (library or
    CLI) fails at once naming the folder and the holder's pid; the first then finishes and loads."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    folder = out / "checkpoint"
    child = Child(ctx, driver.token_build, zoo_tokens, BUILD_KW, folder, gate=gate, out=out)
    child.wait_for("batch", 2)
    holder = f"pid {child.proc.pid}"
    assert main(["build", "--hook", HOOK, "--out", str(out), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "another build is using the checkpoint folder" in err and holder in err
    attempts: list[Callable[[], Any]] = [
        lambda: build_itda(zoo_model, zoo_tokens, HOOK, checkpoint_dir=folder, **BUILD_KW)[HOOK],
        lambda: build_itda(
            zoo_model, zoo_tokens, HOOK, checkpoint_dir=folder, resume=True, **BUILD_KW
        )[HOOK],
        lambda: build_itda_from_activations([torch.randn(8, 4)], checkpoint_dir=folder),
    ]
    for attempt in attempts:
        start = time.perf_counter()
        with pytest.raises(CheckpointLockedError, match="another build is using") as raised:
            attempt()
        assert time.perf_counter() - start < 1.0  # before reading a single batch
        assert str(folder) in str(raised.value) and holder in str(raised.value)
    assert child.proc.is_alive()
    gate.touch()
    done = child.finish()
    assert done[0] == "done" and child.proc.exitcode == 0
    for load in (SAE.load_from_disk, ITDA.load_from_disk):
        assert load(out).cfg.d_sae == done[1]
    assert (folder / LOCK_FILE).read_text() == ""  # released
    finished = build_itda(
        zoo_model,
        _batches(zoo_tokens),
        HOOK,
        checkpoint_dir=folder,
        resume=True,
        progress=False,
        **BUILD_KW,
    )[HOOK]
    assert finished.cfg.d_sae == done[1]  # free again once the first build is done


def test_build_lock_is_reentrant_per_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with build_lock(tmp_path):
                pass
        except BaseException as err:  # reported below
            errors.append(err)

    with keep_build_lock(tmp_path / "lazy"):
        assert not (tmp_path / "lazy").exists()  # nothing is created until a build takes it
    with build_lock(tmp_path), build_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointLockedError)
    assert "another thread of this process" in str(errors[0])
    with build_lock(tmp_path):  # released by the outer exit
        pass


# --- A4: writes over a file-size limit ----------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "itda", "fails_on"),
    [
        pytest.param(None, (1, 1000, 0), "sae_weights.safetensors", id="weights-fresh-folder"),
        pytest.param((0, 30), (1, 1000, 0), "sae_weights.safetensors", id="weights-over-old-save"),
        pytest.param(None, (1, 10, 300_000), "cfg.json", id="cfg-fresh-folder"),
        pytest.param((0, 30), (1, 10, 300_000), "cfg.json", id="cfg-over-old-save"),
    ],
)
def test_save_over_a_file_size_limit_leaves_nothing_that_loads_wrongly(
    previous: tuple[int, int] | None,
    itda: tuple[int, int, int],
    fails_on: str,
    ctx: ForkServerContext,
    tmp_path: Path,
) -> None:
    """1000 atoms make a 1 MB weights file; 300 kB of metadata make a cfg.json larger than the
    weights of 10 atoms. The limit is 200 kB."""
    old = None
    if previous is not None:
        old = driver.random_itda(*previous)
        old.save_model(tmp_path)
    child = Child(ctx, driver.limited_write, 200_000, "save", tmp_path, itda)
    msg = child.finish()
    assert msg[:2] == ("error", "OSError"), msg
    assert f"could not write {tmp_path / fails_on}" in msg[2] and "File too large" in msg[2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if old is not None and fails_on == "sae_weights.safetensors":
        for load in (SAE.load_from_disk, ITDA.load_from_disk):  # untouched: the old save
            _assert_same_dictionary(load(tmp_path), old)
    elif old is not None:  # new weights, old cfg.json: refused
        for load in (SAE.load_from_disk, ITDA.load_from_disk):
            with pytest.raises(ValueError, match=MIXED):
                load(tmp_path)
    else:
        assert not (tmp_path / "cfg.json").exists()
        with pytest.raises(ValueError, match=r"no cfg\.json"):
            ITDA.load_from_disk(tmp_path)
        with pytest.raises(FileNotFoundError):
            SAE.load_from_disk(tmp_path)


def test_checkpoint_over_a_file_size_limit_keeps_the_last_one_resumable(
    ctx: ForkServerContext, tmp_path: Path
) -> None:
    """The limit is set once two checkpoints are written; the third (larger) one fails."""
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(16, 64, generator=g) for _ in range(8)]
    kw: dict[str, Any] = {"k": 4, "cos_threshold": 0.9, "progress": False}
    child = Child(ctx, driver.limited_write, 0, "checkpoint", tmp_path, acts)
    _, size = child.wait_for("limited")
    msg = child.finish()
    assert msg[:2] == ("error", "OSError"), msg
    assert f"could not write {tmp_path / CHECKPOINT_FILE}" in msg[2] and "File too large" in msg[2]
    assert temporaries(tmp_path / CHECKPOINT_FILE) == []
    assert (tmp_path / CHECKPOINT_FILE).stat().st_size == size
    assert _checkpoint_state(tmp_path)["batches"] == 2
    resumed = build_itda_from_activations(iter(acts), checkpoint_dir=tmp_path, resume=True, **kw)
    _assert_same_dictionary(resumed, build_itda_from_activations(iter(acts), **kw))


# --- C: an ITDA without a hook name ---------------------------------------------------------


def test_itda_without_hook_name_says_what_to_set(model: HookedSAETransformer) -> None:
    itda = ITDA.from_atoms(torch.randn(12, model.cfg.d_model), k=2)
    tokens = make_tokens(8)
    for run in (evaluate, evaluate_all):
        with pytest.raises(ValueError, match=r"has no hook_name.*hook_name= to ITDA\.from_atoms"):
            run(itda, model, tokens)
    itda.cfg.metadata.hook_name = HOOK
    assert evaluate(itda, model, tokens)["l0"] > 0
