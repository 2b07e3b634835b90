"""The names `clients` exports, and what the package may import."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

import clients

PACKAGE_DIR = Path(clients.__file__).parent


def test_all_is_pinned() -> None:
    assert clients.__all__ == [
        "AuthenticationError",
        "Chunk",
        "DeadlineExceededError",
        "EmbedResult",
        "End",
        "GenerateEvent",
        "GenerateKind",
        "InternalError",
        "InvalidRequestError",
        "Loading",
        "ModelInfo",
        "ModelList",
        "ModelNotFoundError",
        "PermissionDeniedError",
        "Priority",
        "Queued",
        "RateLimitError",
        "RequestCancelledError",
        "RequestTooLargeError",
        "RouterClient",
        "RouterError",
        "ServerInfo",
        "StatusSummary",
        "Timing",
        "UnavailableError",
        "Usage",
        "WatchEvent",
        "WatchEventKind",
        "WrongModelKindError",
        "from_rpc_error",
        "map_rpc_errors",
    ]


@pytest.mark.parametrize("name", clients.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    module = importlib.import_module("clients")
    assert getattr(module, name) is not None


def test_every_error_derives_from_router_error() -> None:
    errors = [
        value
        for value in vars(clients).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    assert len(errors) == 12
    assert all(issubclass(error, clients.RouterError) for error in errors)


@pytest.mark.parametrize(
    "value_class",
    [
        clients.Chunk,
        clients.EmbedResult,
        clients.End,
        clients.Loading,
        clients.ModelInfo,
        clients.ModelList,
        clients.Queued,
        clients.ServerInfo,
        clients.StatusSummary,
        clients.Timing,
        clients.Usage,
        clients.WatchEvent,
    ],
)
def test_values_are_frozen_dataclasses_with_slots(value_class: type) -> None:
    assert dataclasses.is_dataclass(value_class)
    assert vars(value_class)["__dataclass_params__"].frozen
    assert "__slots__" in vars(value_class)


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.glob("*.py")), ids=lambda path: path.name)
def test_package_imports_only_stubs_grpc_and_the_standard_library(path: Path) -> None:
    allowed_roots = {"clients", "grpc", "grpc_status", "google", *sys.stdlib_module_names}
    forbidden = {
        module
        for module in _imported_modules(path)
        if module.split(".")[0] not in allowed_roots
        and not (module == "router.v1" or module.startswith("router.v1."))
    }
    assert forbidden == set()
