"""The tests' own layout: one folder per package, shared code in tests/helpers only.

- every test file is in a folder (tests/compiler, executor, plangen, heal, repo),
  where a newcomer looks for the tests of that package;
- no test file, conftest or helper imports a test file or a conftest (builders
  and constants are in tests/helpers, fixtures in the conftest.py files);
- no path is computed from `__file__` outside tests/helpers/paths.py;
- the folders named like the packages do not shadow them: `import executor` in a
  test gets the repository's executor package.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

TESTS = ROOT / "tests"
FOLDERS = {"compiler", "executor", "plangen", "heal", "repo"}
SOURCES = sorted(TESTS.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_test_file_is_in_a_package_folder() -> None:
    misplaced = [_rel(p) for p in TESTS.rglob("test_*.py") if p.parent.name not in FOLDERS]
    assert not misplaced, f"move into tests/{{{','.join(sorted(FOLDERS))}}}/: {misplaced}"
    assert {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        *FOLDERS,
        "helpers",
    }


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_test_file_imports_another() -> None:
    bad = []
    for path in SOURCES:
        for name in _imported(ast.parse(path.read_text(encoding="utf-8"))):
            last = name.rsplit(".", 1)[-1]
            if last.startswith("test_") or last == "conftest":
                bad.append(f"{_rel(path)}: {name}")
    assert not bad, "import from tests/helpers instead:\n" + "\n".join(bad)


def test_paths_come_from_the_helpers() -> None:
    bad = [
        _rel(p)
        for p in SOURCES
        if p != TESTS / "helpers" / "paths.py"
        and any(
            isinstance(n, ast.Name) and n.id == "__file__"
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        )
    ]
    assert not bad, f"use tests.helpers.paths (ROOT, EXAMPLES, SHARED_MOE, ...): {bad}"


@pytest.mark.parametrize("package", ["compiler", "executor", "plangen", "heal"])
def test_test_folders_do_not_shadow_the_packages(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve() == ROOT / package / "__init__.py"
    assert importlib.import_module(f"tests.{package}").__file__ != module.__file__
