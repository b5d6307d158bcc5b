"""The package's layers: imports only run downward (application -> analyses -> builder ->
activations -> saes -> engine), with no cycles, and each layer's modules live where the README's
layout table says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "itda_lens"
#: module (dotted, relative to itda_lens) or package prefix -> layer (higher imports lower)
LAYERS = {
    "pursuit": 0,
    "kernels": 0,
    "dictionary": 0,
    "gram": 0,
    "budget": 0,
    "saes": 1,
    "activations": 2,
    "builder": 3,
    "similarity": 4,
    "splinterp": 4,
    "training": 4,
    "warmstart": 4,
    "analysis": 4,
    "diffing": 4,
    "config": 5,
    "trainers": 5,
    "cli": 5,
    "demo": 5,
    "diff_report": 5,
    "dashboard": 5,
    "evals": 5,
    "probing": 5,
    "resolve": 5,
    "models": 5,
    "plots": 5,
    "zoo": 5,
    "__main__": 5,
    "sources": 2,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    head = module.split(".")[0]
    if head not in LAYERS:
        raise AssertionError(f"itda_lens.{module} is in no layer: add it to LAYERS and the README")
    return LAYERS[head]


def imports(path: Path, known: set[str]) -> set[str]:
    """itda_lens modules imported by the file (``from itda_lens import x`` counts as module x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("itda_lens"):
            base = node.module.removeprefix("itda_lens").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("itda_lens."):
                    found.add(alias.name.removeprefix("itda_lens."))
    return found


def test_imports_only_run_downward_without_cycles() -> None:
    mods = modules()
    known = set(mods)
    graph = {m: imports(p, known) - {m} for m, p in mods.items() if m}
    for mod, deps in graph.items():
        for dep in deps:
            assert dep != "", f"itda_lens.{mod} imports the package facade; import the module"
            assert layer(dep) <= layer(mod), (
                f"itda_lens.{mod} (layer {layer(mod)}) imports itda_lens.{dep} (layer {layer(dep)})"
            )
    # no cycles (same-layer imports are allowed, loops are not)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*stack, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            if d in graph:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_engine_knows_neither_sae_lens_nor_transformer_lens() -> None:
    for name in ("pursuit", "kernels", "dictionary", "gram", "budget"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        roots = {
            (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        } | {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        assert not roots & {"sae_lens", "transformer_lens"}, f"{name}.py imports {roots}"


def test_readme_layout_table_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for mod, path in modules().items():
        if not mod or (
            path.name == "__init__.py" and mod.count(".") == 0 and (PACKAGE / mod).is_dir()
        ):
            continue
        rel = path.relative_to(PACKAGE.parent).as_posix()
        top = rel.split("/")[1]
        named = rel in table or ((PACKAGE / top).is_dir() and f"itda_lens/{top}/" in table)
        assert named, f"{rel} is not in the README's layout table"


def test_readme_guarantees_name_tests_that_exist() -> None:
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    current = None
    refs = 0
    for token in re.findall(r"`([^`]+)`", section):
        path, _, name = token.partition("::")
        if path.startswith("tests/"):
            current = path
        elif token.startswith("::") and current:
            name = token[2:]
        else:
            continue
        file = PACKAGE.parent / current
        assert file.is_file(), f"README Guarantees: no {current}"
        if name:
            assert re.search(rf"def {re.escape(name)}\b", file.read_text()), f"{current}::{name}"
            refs += 1
    assert refs >= 10


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names() -> None:
    """A module's underscore names are its own: nothing imports ``_name`` from another module or
    reaches into an imported itda_lens module's ``_attr``, and an underscore module
    (``saes/_io.py``) is imported only from inside its own package."""
    mods = modules()
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        package = "itda_lens." + mod if is_pkg else "itda_lens." + mod.rpartition(".")[0]
        package = package.rstrip(".")
        imported_modules: set[str] = set()
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("itda_lens")
            ):
                continue
            assert node.module is not None
            for alias in node.names:
                assert not _private(alias.name), (
                    f"itda_lens.{mod} imports {alias.name} from {node.module}"
                )
                if f"{node.module}.{alias.name}".removeprefix("itda_lens.") in mods:
                    imported_modules.add(alias.asname or alias.name)
            parts = node.module.split(".")
            for i, part in enumerate(parts):
                if _private(part):
                    owner = ".".join(parts[:i])
                    assert package == owner, (
                        f"itda_lens.{mod} imports the private module {node.module} of {owner}"
                    )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and _private(node.attr)
            ):
                pytest.fail(f"itda_lens.{mod} reaches into {node.value.id}.{node.attr}")
