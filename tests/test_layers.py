"""Imports point one way (docs/architecture.md): cli -> api / agent / orchestrator ->
persistence / transport -> schemas. Read from the source, so an import under
`TYPE_CHECKING` or inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import chiffon

SRC = Path(chiffon.__file__).parent
# What each package may import from chiffon (besides itself); cli may import anything.
MAY_IMPORT: dict[str, set[str]] = {
    "backoff": set(),
    "schemas": set(),
    "transport": {"schemas", "backoff"},
    "persistence": {"schemas"},
    "agent": {"schemas", "transport", "backoff"},
    "orchestrator": {"schemas", "transport", "persistence", "backoff"},
    "api": {"schemas", "transport", "persistence", "orchestrator", "backoff", "dashboard"},
    "client": {"schemas", "backoff"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("chiffon.")]


def test_no_package_imports_one_above_it() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        package = path.relative_to(SRC).parts[0].removesuffix(".py")
        if package not in MAY_IMPORT:
            continue  # cli, the package's own __init__ and __main__
        for line, name in _imports(path):
            target = name.split(".")[1]
            if target != package and target not in MAY_IMPORT[package]:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from chiffon.orchestrator.service import Orchestrator\n")  # fmt: skip
    assert _imports(module) == [(3, "chiffon.orchestrator.service")]
