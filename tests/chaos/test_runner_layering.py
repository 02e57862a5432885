"""Layers point one way: the scenario harness uses only the public API of resilient-db
(``resilient_db`` and the public modules of ``resilient_db.chaos``), and the core never
imports the chaos package."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import resilient_db
import resilient_db.chaos

PACKAGE = Path(resilient_db.__file__).parent
HARNESS = ("cli", "scenario", "runner", "invariants", "report", "_progress", "__main__")
PART_ONE = ("resilient_db.chaos.proxy", "resilient_db.chaos.injector")


def imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(module, names, level) of every import in a file."""
    found: list[tuple[str, tuple[str, ...], int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", tuple(a.name for a in node.names), node.level))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, (), 0) for alias in node.names)
    return found


@pytest.mark.parametrize("module", HARNESS)
def test_the_harness_imports_only_public_names(module: str) -> None:
    own = {f"resilient_db.chaos.{m}" for m in HARNESS}
    problems = []
    for name, names, level in imports(PACKAGE / "chaos" / f"{module}.py"):
        if level:
            problems.append(f"relative import from {'.' * level}{name}")
        elif name == "resilient_db":
            problems.extend(
                f"resilient_db.{n} is not in resilient_db.__all__"
                for n in names
                if n not in resilient_db.__all__
            )
        elif name == "resilient_db.chaos":
            problems.extend(
                f"resilient_db.chaos.{n} is not public"
                for n in names
                if n not in resilient_db.chaos.__all__
            )
        elif name.startswith("resilient_db.") and name not in own | set(PART_ONE):
            problems.append(f"imports {name}, which is not part of the public API")
    assert problems == []


def test_the_core_never_imports_the_chaos_package() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "chaos":
            continue
        for name, names, level in imports(path):
            absolute = name.startswith("resilient_db.chaos")
            relative_chaos = level > 0 and (name.startswith("chaos") or "chaos" in names)
            if absolute or relative_chaos:
                offenders.append(f"{relative}: {name or names}")
    assert offenders == []


def test_the_chaos_namespace_is_sorted_and_documented() -> None:
    names = resilient_db.chaos.__all__
    assert names == sorted(names)
    undocumented = [
        n
        for n in names
        if (
            inspect.isclass(getattr(resilient_db.chaos, n))
            or inspect.isfunction(getattr(resilient_db.chaos, n))
        )
        and not inspect.getdoc(getattr(resilient_db.chaos, n))
    ]
    assert undocumented == []
