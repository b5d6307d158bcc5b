"""The README's Python blocks run, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # blocks write out/, dash/
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block, not just the line
            raise AssertionError(f"README python block {i} failed: {err!r}\n{block}") from err
    assert os.path.isfile("dash/index.html") and os.path.isdir("out")
