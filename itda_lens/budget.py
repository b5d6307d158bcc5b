"""One memory budget for the engine: how many bytes pursuit and the builder may hold beyond the
dictionary itself (Gram rows, their cache, chunk buffers), sized from the device's free memory.

The default is :data:`DEFAULT_FRACTION` of the memory free on the device when the plan is made
(``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on CPU). A user sets one number for the whole
process with :func:`set_memory_budget` (or the ``ITDA_LENS_MEMORY_BUDGET`` environment variable,
e.g. ``4GiB``), or per call with ``budget=``. Every planner reads it through :func:`memory_budget`.
"""

from __future__ import annotations

import os
import re

import torch

__all__ = [
    "DEFAULT_FRACTION",
    "ENV_VAR",
    "MIN_BUDGET",
    "default_device",
    "free_memory",
    "memory_budget",
    "parse_bytes",
    "set_memory_budget",
]

#: Share of the device's free memory the engine plans with by default.
DEFAULT_FRACTION = 0.5
#: Smallest budget a plan accepts (below it nothing useful fits).
MIN_BUDGET = 4096
ENV_VAR = "ITDA_LENS_MEMORY_BUDGET"
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_IUNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_budget: int | None = None


def parse_bytes(value: int | float | str) -> int:
    """``4GiB``, ``512MB``, ``1e9`` or an int -> bytes; refuses anything else with a clear error."""
    if isinstance(value, bool):
        raise ValueError(f"a memory budget must be a size in bytes, got {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(value), re.I)
        if m is None:
            raise ValueError(
                f"cannot read memory budget {value!r}: use bytes or a size like '4GiB' or '512MB'"
            )
        unit = (m.group(2) or "").lower()
        n = float(m.group(1)) * (_IUNITS.get(unit) or _UNITS[unit])
    if not n >= MIN_BUDGET:  # also refuses NaN
        raise ValueError(f"a memory budget must be at least {MIN_BUDGET} bytes, got {value!r}")
    return int(n)


def set_memory_budget(value: int | float | str | None) -> None:
    """Set the process-wide budget (bytes or a size string); ``None`` returns to the default."""
    global _budget
    _budget = None if value is None else parse_bytes(value)


def free_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free on ``device`` now (CUDA: ``mem_get_info``; CPU: ``MemAvailable``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":  # pragma: no cover - no Apple GPU here
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # pragma: no cover


def memory_budget(
    device: str | torch.device = "cpu", budget: int | float | str | None = None
) -> int:
    """The bytes a plan on ``device`` may use: ``budget`` if given, else the process-wide setting,
    else ``$ITDA_LENS_MEMORY_BUDGET``, else :data:`DEFAULT_FRACTION` of the free memory."""
    if budget is not None:
        return parse_bytes(budget)
    if _budget is not None:
        return _budget
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return parse_bytes(env)
        except ValueError as err:
            raise ValueError(f"${ENV_VAR}: {err}") from None
    return max(MIN_BUDGET, int(free_memory(device) * DEFAULT_FRACTION))


def default_device(fallback: str | torch.device = "cpu") -> str:
    """Where work goes unless told otherwise: ``cuda`` when a CUDA device is present, else
    ``fallback`` (e.g. the model's device)."""
    return "cuda" if torch.cuda.is_available() else str(fallback)
