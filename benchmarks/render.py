"""Render the tables in ``benchmarks/README.md`` from the committed results JSON.

A table in the README sits between two markers naming its source::

    <!-- table: build.json#rules -->
    | ... rendered here ... |
    <!-- /table -->

``python benchmarks/render.py`` rewrites every marked table from ``benchmarks/results/``;
``--check`` only reports the tables that differ (the test suite runs it).

Sentences with numbers sit between claims markers naming the results they come from::

    <!-- claims: scale.json build.json -->
    - ITDA encodes 32,768 atoms 49.0x faster than the literal algorithm ...
    <!-- /claims -->

:func:`unsourced_claims` checks that every number in such a block appears in one of its files (as
printed in a table, or as a raw value at the printed precision, or as a percentage of one), and
that no measurement-like number (``1.8x``, ``42%``, ``0.91``, ``165 s``, ``2.1 GB``) stands in the
README's prose outside a claims block. Code, tables and settings in backticks are not claims.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS, markdown

README = Path(__file__).resolve().parent / "README.md"
#: the READMEs whose prose numbers are checked against the results
READMES = (README, README.parents[1] / "README.md")
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


CLAIMS = re.compile(r"<!-- claims: (?P<files>[\w.\- ]+?) -->\n(?P<body>.*?)<!-- /claims -->", re.S)
#: a number in prose: not part of a name (``kjv-4l128``, ``L0``) or a version
NUMBER = re.compile(
    r"(?<![A-Za-z_.\d])(?<![A-Za-z]-)(\d[\d,]*(?:\.\d+)?)(?![\d.]*[A-Za-z_](?<!x)\b)"
)
#: what a measurement looks like in prose: a decimal, a percentage, a duration, a size, a rate,
#: a comparison ("12x more atoms"; integer multiples such as "8x d_model" are widths, not results)
MEASURE = re.compile(
    r"(?<![A-Za-z_.\d])(?<![A-Za-z]-)(?:\d[\d,]*\.\d+[x%]?|\d[\d,]*(?:%|\s?(?:s|min|minutes?|"
    r"seconds?|hours?|[KMG]i?B|tok/s|nats?)\b)|\d[\d,]*x\s+(?:more|fewer|less|faster|slower|"
    r"smaller|larger|as)\b)(?![\w.]*\d)"
)
#: small integers are settings and counts far more often than results ("2 ranks", "4 layers")
SMALL = 12


def _prose(text: str) -> str:
    """``text`` without code blocks, tables, HTML comments and code spans."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))
    return re.sub(r"`[^`]*`", "", text)


def _values(obj: Any, out: set[str]) -> set[str]:
    """Every number in a results JSON as it could be printed: table cells as written, raw values
    rounded to 0-4 decimals, and fractions as percentages."""
    if isinstance(obj, dict):
        for v in obj.values():
            _values(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _values(v, out)
    elif isinstance(obj, str):
        out.update(m.replace(",", "") for m in re.findall(r"\d[\d,]*(?:\.\d+)?", obj))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        for scale in (1, 100):
            for p in range(5):
                out.add(f"{obj * scale:.{p}f}")
    return out


def unsourced_claims(text: str, results: Path = RESULTS) -> list[str]:
    """Numbers in claims blocks found in none of their results files, and measurement-like
    numbers in prose outside any claims block."""
    problems = []
    cache: dict[str, set[str]] = {}
    for m in CLAIMS.finditer(text):
        known: set[str] = set()
        for name in m["files"].split():
            path = results / name
            if not path.is_file():
                problems.append(f"claims cite {name}, which is not in {results}")
                continue
            if name not in cache:
                cache[name] = _values(json.loads(path.read_text()), set())
            known |= cache[name]
        for num in NUMBER.findall(_prose(m["body"])):
            n = num.replace(",", "")
            if "." not in n and int(n) <= SMALL:
                continue
            if n not in known:
                problems.append(f"{num} (in: {m['files']}) is in none of its results files")
    outside = CLAIMS.sub("", text)
    for line in _prose(outside).splitlines():
        for hit in MEASURE.findall(line):
            problems.append(f"unsourced number {hit.strip()!r} in: {line.strip()[:100]}")
    return problems


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
        claims = [p for r in READMES for p in unsourced_claims(r.read_text())]
        print("\n".join(claims) if claims else "every number in the READMEs' prose has its source")
        sys.exit(1 if bad or claims else 0)
    README.write_text(render(text))
    print(f"rendered {len(MARKER.findall(text))} tables into {README}")


if __name__ == "__main__":
    main()
