"""What every architecture's save folder shares: checks before sae_lens loads it, the one atomic
write (a file is replaced whole or not at all, and a failed write leaves no temporary behind), and
idempotent registration with sae_lens."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_lens import SAE, SAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from safetensors import SafetensorError, safe_open
from torch import Tensor


def check_sae_folder(
    path: str | Path,
    on_tensor: Callable[[str, Tensor], None] | None = None,
    check_cfg: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Validate a sae_lens save folder (cfg.json + readable weights) before loading; return its cfg.

    ``check_cfg(cfg)``, if given, runs on the parsed cfg.json before the weights are read. Every
    tensor of the weights file is read (which catches truncated payloads) and, if given, handed to
    ``on_tensor(name, tensor)`` as stored (dtype and shape as on disk)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE folder at {path}")
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise ValueError(f"{path} is not an SAE folder: it has no {SAE_CFG_FILENAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt {cfg_path}: {err}") from err
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ValueError(f"{cfg_path} is not a sae_lens config (no architecture)")
    if check_cfg is not None:
        check_cfg(cfg)
    if not weights_path.is_file():
        raise ValueError(f"{path} is incomplete: {SAE_WEIGHTS_FILENAME} is missing")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - reading every tensor catches truncated payloads
                tensor = f.get_tensor(key)
                if on_tensor is not None:
                    on_tensor(key, tensor)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"corrupt or truncated weights file {weights_path}: {err}") from err
    return cfg


def atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
    """Write ``target`` through ``write(tmp)`` on a temporary file, fsync it and rename it into
    place: readers see the old file or the new one, never a partial one.

    A write that fails (disk full, file-size limit, ...) raises ``OSError`` naming ``target``,
    leaves the previous ``target`` untouched and removes the temporary file. A process killed
    mid-write can leave a temporary behind (``temporaries(target)`` finds them); no loader reads
    it."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except (OSError, SafetensorError) as err:
        code = getattr(err, "errno", None)
        if code is None and (found := re.search(r"os error (\d+)", str(err))):
            code = int(found.group(1))
        message = (
            f"could not write {target} ({os.strerror(code) if code else err}); "
            f"any previous {target.name} is unchanged"
        )
        raise (OSError(code, message) if code else OSError(message)) from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def temporaries(target: Path) -> list[Path]:
    """Temporary files that :func:`atomic_write` left next to ``target`` (a killed writer's)."""
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def register_architecture(name: str, sae_class: type[SAE[Any]], cfg_class: type[SAEConfig]) -> None:
    """Register an architecture with sae_lens; idempotent under re-import (e.g. module reloads),
    loud if a different class already owns the name."""
    current = SAE_CLASS_REGISTRY.get(name)
    if current is None:
        register_sae_class(name, sae_class, cfg_class)
    elif (current[0].__module__, current[0].__qualname__) == (
        sae_class.__module__,
        sae_class.__qualname__,
    ):
        SAE_CLASS_REGISTRY[name] = (sae_class, cfg_class)
    else:
        raise RuntimeError(
            f"sae_lens architecture {name!r} is already registered by "
            f"{current[0].__module__}.{current[0].__qualname__}"
        )
