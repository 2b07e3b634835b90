"""The facade imports nothing from the router but its stubs and the shared settings schema."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import facade

PACKAGE_DIR = Path(facade.__file__).parent
# Shared leaf modules: the stubs, the settings schema, logging setup and tracing setup.
ALLOWED_FROM_ROUTER = ("router.v1", "router.config", "router.logs", "router.telemetry.tracing")


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize(
    "path", sorted(PACKAGE_DIR.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE_DIR))
)
def test_router_imports_are_the_stubs_and_the_config_only(path: Path) -> None:
    forbidden = {
        module
        for module in imported_modules(path)
        if module.split(".")[0] == "router"
        and not any(
            module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED_FROM_ROUTER
        )
    }
    assert forbidden == set()
