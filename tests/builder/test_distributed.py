"""Data-parallel builds on torch.distributed (gloo, 2 processes spawned from the test): the same
dictionary as one process, a rank whose model differs is refused, and a build killed mid-way
resumes with 1 or 2 ranks to the single-process dictionary."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from itda_lens import ITDA
from itda_lens.builder.checkpoint import CHECKPOINT_FILE
from itda_lens.builder.distributed import shard
from tests import _distributed_driver as driver

DRIVER = Path(driver.__file__)


def spawn(
    world: int, out: Path, checkpoint: Path | None = None, *flags: str
) -> list[subprocess.Popen]:
    store = out.parent / f"store-{uuid.uuid4().hex}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(DRIVER),
                str(r),
                str(world),
                str(store),
                str(out),
                str(checkpoint or ""),
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def load(out: Path) -> dict[str, ITDA]:
    return {h: ITDA.load_from_disk(out / h) for h in driver.HOOKS}


def same(a: dict[str, ITDA], b: dict[str, ITDA]) -> None:
    for hook in driver.HOOKS:
        assert torch.equal(a[hook].W_dec, b[hook].W_dec), hook
        assert torch.equal(a[hook].atom_labels, b[hook].atom_labels), hook
        assert (
            a[hook].require_build_record().tokens_seen == b[hook].require_build_record().tokens_seen
        )


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ITDA]:
    out = tmp_path_factory.mktemp("single")
    driver.build(out)
    return load(out)


def test_shards_are_contiguous_and_cover_the_batch() -> None:
    for n in (0, 1, 7, 8, 9):
        for world in (1, 2, 3):
            bounds = [shard(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_two_ranks_build_the_single_process_dictionary(
    single: dict[str, ITDA], tmp_path: Path
) -> None:
    results = finish(spawn(2, tmp_path / "two"))
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    two = load(tmp_path / "two")
    same(two, single)
    assert not (tmp_path / "two").with_name("rank1").exists()


def test_a_rank_with_another_model_is_refused(tmp_path: Path) -> None:
    results = finish(spawn(2, tmp_path / "bad", None, "perturb"))
    assert all(rc != 0 for rc, _ in results)
    assert all("disagree with rank 0" in err for _, err in results), results[0][1][-1500:]


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused(tmp_path: Path) -> None:
    results = finish(spawn(2, tmp_path / "odd", None, "batch_size=7"))
    assert all(rc != 0 for rc, _ in results)
    assert all("does not divide among 2 ranks" in err for _, err in results), results[0][1][-1500:]


def test_a_resume_with_other_settings_is_refused_on_every_rank(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    driver.build(tmp_path / "one", ckpt, max_tokens=1024)  # a short single-process build
    results = finish(spawn(2, tmp_path / "two", ckpt, "resume", "k=4"))
    assert all(rc != 0 for rc, _ in results)
    assert all("written with other settings" in err for _, err in results), results[1][1][-1500:]


def _state(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def test_killed_build_resumes_with_one_or_two_ranks(
    single: dict[str, ITDA], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    procs = spawn(2, tmp_path / "killed", ckpt)
    deadline = time.time() + 90
    while not (ckpt / CHECKPOINT_FILE).exists() and time.time() < deadline:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)  # one rank dies; the other cannot go on alone
    procs[0].send_signal(signal.SIGKILL)
    finish(procs)
    state = _state(ckpt / CHECKPOINT_FILE)
    assert not state["finished"] and state["batches"] >= 1, "killed before the end"
    again = tmp_path / "ckpt2"
    shutil.copytree(ckpt, again)
    driver.build(tmp_path / "one", ckpt, resume=True)  # resumed by one process
    same(load(tmp_path / "one"), single)
    results = finish(spawn(2, tmp_path / "two", again, "resume"))  # and by two ranks
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:]
    same(load(tmp_path / "two"), single)
