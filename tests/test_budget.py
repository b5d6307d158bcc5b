"""The memory budget: parsing, precedence, the default from free memory, device choice."""

from __future__ import annotations

import pytest
import torch

from itda_lens import budget
from itda_lens.budget import (
    ENV_VAR,
    default_device,
    free_memory,
    memory_budget,
    parse_bytes,
    set_memory_budget,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5gib", int(1.5 * 2**30)), (10**9, 10**9),
     ("65536", 65536), ("8 KiB", 8192)],
)  # fmt: skip
def test_sizes_parse(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "4 parsecs", "-1GB", 12, float("nan"), True, "1KB"])
def test_bad_sizes_are_refused_clearly(bad: object) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        parse_bytes(bad)  # type: ignore[arg-type]


def test_precedence_call_then_process_then_environment_then_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(budget, "free_memory", lambda device="cpu": 8 * 2**30)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert memory_budget() == int(8 * 2**30 * budget.DEFAULT_FRACTION)
    monkeypatch.setenv(ENV_VAR, "1GiB")
    assert memory_budget() == 2**30
    set_memory_budget("2GiB")
    try:
        assert memory_budget() == 2 * 2**30
        assert memory_budget(budget="3GiB") == 3 * 2**30
    finally:
        set_memory_budget(None)
    monkeypatch.setenv(ENV_VAR, "huge")
    with pytest.raises(ValueError, match=ENV_VAR):
        memory_budget()


def test_free_memory_reads_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert free_memory("cpu") > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 8 * 2**30))
    assert free_memory("cuda") == 5 * 2**30
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert memory_budget("cuda") == int(5 * 2**30 * budget.DEFAULT_FRACTION)


def test_cuda_is_the_default_device_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu" and default_device("meta") == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
