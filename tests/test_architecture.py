"""docs/architecture.md stays true: its module map names every module of the package once,
and no part imports the client that composes the parts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import keevx_async

PACKAGE = Path(keevx_async.__file__).parent
MAP = Path(__file__).parent.parent / "docs" / "architecture.md"
# Who may import the client: the package's front door, the synchronous client that runs
# one, the demo and the test kit (``fake.client()``).
CLIENT_USERS = {"__init__.py", "_sync.py", "_demo.py", "_cli", "testing"}


def _mapped_modules() -> list[str]:
    names = []
    for row in re.findall(r"^\| (`[^|]+) \|", MAP.read_text(), flags=re.MULTILINE):
        names += re.findall(r"`([^`]+)`", row)
    return names


def _package_modules() -> set[str]:
    found = {path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    found |= {f"{path.name}/" for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    return found


def test_the_module_map_names_every_module_once() -> None:
    mapped = _mapped_modules()
    assert sorted(mapped) == sorted(set(mapped)), "a module is mapped twice"
    assert set(mapped) == _package_modules()


def _imports_client(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ("_client", "keevx_async._client"):
            return True
    return False


def test_no_part_imports_the_client() -> None:
    importers = {
        path.relative_to(PACKAGE).parts[0]
        for path in PACKAGE.rglob("*.py")
        if path.name != "_client.py" and _imports_client(path)
    }
    assert importers <= CLIENT_USERS
