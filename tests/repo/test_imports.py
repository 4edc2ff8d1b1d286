"""The import structure stays as issue 35 left it: layered, without circles, no private names.

The project's modules are read with `ast` (nothing is imported), every import
statement is an edge (those inside functions too: a lazy import is still a
dependency), and three rules are checked:

- no cycle among the modules of grammar, compiler, executor, plangen and heal;
- dependencies point one way: grammar ← compiler ← executor ← plangen, heal
  (plangen and heal import neither each other nor upward; the planner reaches
  the executor only to load a model);
- no private name (`_x`) is imported from another module.

What could not be removed yet is listed below, each with its reason: the lists
are the to-do, and an entry that no longer occurs fails the test (so the
lists only shrink).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from tests.helpers.paths import ROOT

PACKAGES = ("grammar", "compiler", "executor", "plangen", "heal")
# What each package may import (besides the standard library and third parties).
MAY_IMPORT = {
    "grammar": {"grammar"},
    "compiler": {"grammar", "compiler"},
    "executor": {"grammar", "compiler", "executor"},
    "plangen": {"grammar", "compiler", "executor", "plangen"},
    "heal": {"grammar", "compiler", "executor", "heal"},
}
# The executor modules the planner may import: loading a model (whole or one layer
# at a time), its loss, the device it runs on, the processes that share a walk
# under torchrun (the walk's batches and its sums over them), and the threads that
# run a layer's batches in step (the sequential reconstruction's one forward a layer).
PLANGEN_MAY_USE_FROM_EXECUTOR = {
    "executor.loader",
    "executor.layerwise",
    "executor.lockstep",
    "executor.lm_loss",
    "executor.device",
    "executor.distributed",
    "executor.sharding",  # a layer the sweep shards: its tensors gathered when read
}

# (importer, imported) edges against the layering, each with why it stays.
# Empty: `plancc heal` reaches the executor's CLI as an entry point, not an import.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
# Cycles not removed yet (each a frozenset of modules): the to-do. Empty: none left.
ALLOWED_CYCLES: set[frozenset[str]] = set()
# (importer, imported module, name) private imports not removed yet. Empty: none left.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the project module imported (a package means its __init__)
    name: str | None  # `from module import name` (a non-module name); None otherwise
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield Import(name, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(
                    name, path.name == "__init__.py", node.level, node.module
                )
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from package import module`
                    yield Import(name, sub, None, node.lineno)
                else:
                    yield Import(name, source, alias.name, node.lineno)


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def package(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_the_project() -> None:
    modules = project_modules()
    assert {"compiler.geometry", "executor.slicing", "plangen.pipeline", "heal.cli"} <= set(modules)
    edges = {(i.importer, i.module) for i in all_imports()}
    assert ("executor.planning", "compiler.geometry") in edges
    assert ("executor.commands", "executor.apply") in edges  # lazy imports are edges too


def test_no_import_cycle() -> None:
    graph = nx.DiGraph()
    graph.add_nodes_from(project_modules())
    for imp in all_imports():
        if imp.importer != imp.module:
            graph.add_edge(imp.importer, imp.module)
    cycles = {frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1}
    new = sorted(sorted(c) for c in cycles - ALLOWED_CYCLES)
    assert not new, f"import cycles: {new}"
    gone = sorted(sorted(c) for c in ALLOWED_CYCLES - cycles)
    assert not gone, f"allowed cycles that no longer occur (remove them from the list): {gone}"


def test_dependencies_point_one_way() -> None:
    wrong = []
    used = set()
    for imp in all_imports():
        src, dst = package(imp.importer), package(imp.module)
        edge = (imp.importer, imp.module)
        if dst in MAY_IMPORT[src]:
            if (
                src == "plangen"
                and dst == "executor"
                and imp.module not in PLANGEN_MAY_USE_FROM_EXECUTOR
            ):
                wrong.append(f"{imp.importer}:{imp.line} imports {imp.module} (not loading)")
            continue
        if edge in ALLOWED_UPWARD:
            used.add(edge)
            continue
        wrong.append(f"{imp.importer}:{imp.line} imports {imp.module} ({src} → {dst})")
    assert not wrong, "imports against grammar ← compiler ← executor ← plangen, heal:\n" + (
        "\n".join(wrong)
    )
    assert used == set(ALLOWED_UPWARD), f"unused exceptions: {set(ALLOWED_UPWARD) - used}"


def test_no_private_name_imported_across_modules() -> None:
    found = {
        (i.importer, i.module, i.name)
        for i in all_imports()
        if i.name is not None and i.name.startswith("_") and i.importer != i.module
    }
    new = sorted(found - ALLOWED_PRIVATE)
    assert not new, f"private names imported from another module: {new}"
    gone = sorted(ALLOWED_PRIVATE - found)
    assert not gone, f"allowed private imports that no longer occur: {gone}"


def test_the_config_reader_is_below_both_writers() -> None:
    """Reading a written config back (`executor.family_config`) needs neither writer:
    what broke the last circle (configs <-> formats.nemotron_nas) stays broken."""
    used = {i.module for i in all_imports() if i.importer == "executor.family_config"}
    assert used, "the walk saw no import of executor.family_config"
    assert not used & {"executor.configs", "executor.formats.nemotron_nas"}, used
    assert all(package(m) == "compiler" for m in used), used


def test_plancc_heal_is_registered_through_the_entry_point() -> None:
    """`plancc heal` reaches the executor's CLI as a `plancc.commands` entry point
    (pyproject.toml), which the installed package declares; the executor imports no
    heal module (the walk above), yet the subcommand is there."""
    from importlib.metadata import entry_points

    from executor.cli import PLUGIN_GROUP, build_parser

    assert {e.name: e.value for e in entry_points(group=PLUGIN_GROUP)} == {
        "heal": "heal.cli:add_heal"
    }
    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    assert "heal" in sub.choices
