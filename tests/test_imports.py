"""The package's import direction, as README's Development section draws it: a module imports
only from its own row of that table and the rows below it, and only `search/` imports Ray."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "kdsearch"


def readme_rows() -> dict[str, int]:
    """Each part the README's table names (`cli`, `commands`, ...) with its row, top first."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| part | what it holds |") + 2
    rows: dict[str, int] = {}
    for number, line in enumerate(lines[start:]):
        if not line.startswith("|"):
            break
        for name in re.findall(r"`([a-z_]+)(?:\.py|/)`", line.split("|")[1]):
            rows[name] = number
    return rows


def imported(source: Path) -> list[tuple[str, int]]:
    """Every module `source` imports, anywhere in it, as (dotted name, line); `from kdsearch
    import x` counts as `kdsearch.x`, a relative import not at all."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kdsearch":
                found += [(f"kdsearch.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def kdsearch_parts(source: Path) -> list[tuple[str, int]]:
    """The parts of the package (`study`, `cli`, ...) `source` imports, with their lines."""
    return [
        (name.split(".")[1], line)
        for name, line in imported(source)
        if name.startswith("kdsearch.") and name != "kdsearch.__version__"
    ]


def part(source: Path) -> str:
    """The top-level part of the package `source` belongs to (`study` for study/record.py)."""
    return source.relative_to(PACKAGE).with_suffix("").parts[0]


def test_the_readme_table_names_every_part_of_the_package() -> None:
    parts = {part(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts == set(readme_rows())


def test_no_module_imports_from_a_row_above_its_own() -> None:
    rows = readme_rows()
    upward = [
        f"{source.relative_to(REPO)}:{line} imports kdsearch.{name}"
        for source in sorted(PACKAGE.rglob("*.py"))
        if part(source) in rows
        for name, line in kdsearch_parts(source)
        if rows[name] < rows[part(source)]
    ]
    assert upward == []


def test_only_the_search_package_imports_ray() -> None:
    importers = {
        part(source)
        for source in PACKAGE.rglob("*.py")
        for name, _ in imported(source)
        if name == "ray" or name.startswith("ray.")
    }
    assert importers == {"search"}
