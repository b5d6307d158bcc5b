"""Render the tables in ``benchmarks/README.md`` from the committed results JSON.

A table in the README sits between two markers naming its source::

    <!-- table: build.json#rules -->
    | ... rendered here ... |
    <!-- /table -->

``python benchmarks/render.py`` rewrites every marked table from ``benchmarks/results/``;
``--check`` only reports the tables that differ (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from _common import RESULTS, markdown

README = Path(__file__).resolve().parent / "README.md"
MARKER = re.compile(
    r"<!-- table: (?P<file>[\w.-]+)#(?P<table>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S
)


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked table replaced by its rendering from ``results``."""

    def one(m: re.Match[str]) -> str:
        path = results / m["file"]
        if not path.is_file():
            raise FileNotFoundError(f"README table {m['file']}#{m['table']}: no {path}")
        tables = json.loads(path.read_text())["tables"]
        if m["table"] not in tables:
            raise KeyError(f"{path} has no table {m['table']!r} (has {sorted(tables)})")
        return f"<!-- table: {m['file']}#{m['table']} -->\n{markdown(tables[m['table']])}\n<!-- /table -->"

    return MARKER.sub(one, text)


def stale(text: str, results: Path = RESULTS) -> list[str]:
    """Names of the marked tables whose README text differs from their rendering."""
    fresh = {f"{m['file']}#{m['table']}": m["body"] for m in MARKER.finditer(render(text, results))}
    return [
        name
        for m in MARKER.finditer(text)
        if fresh[name := f"{m['file']}#{m['table']}"] != m["body"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="report stale tables, change nothing")
    args = parser.parse_args()
    text = README.read_text()
    if args.check:
        bad = stale(text)
        print("stale tables: " + ", ".join(bad) if bad else "every table matches its results")
        sys.exit(1 if bad else 0)
    README.write_text(render(text))
    print(f"rendered {len(MARKER.findall(text))} tables into {README}")


if __name__ == "__main__":
    main()
