"""The names `clients` exports, and what the package may import."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import typing
from pathlib import Path

import pytest

import clients

PACKAGE_DIR = Path(clients.__file__).parent


def test_all_is_pinned() -> None:
    assert clients.__all__ == [
        "AuthenticationError",
        "Chunk",
        "Completion",
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
        clients.Completion,
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


# Callers program against these signatures: a renamed keyword, a parameter turned
# positional, a changed default or return type breaks them, so each is pinned as text.
_META = "metadata: 'Sequence[tuple[str, str]]' = ()"
_TIMEOUT = "timeout: 'float | None' = None"
CLIENT_MEMBERS = {
    "__init__": (
        "method",
        "(self, target: 'str' = '127.0.0.1:50051', *, api_key: 'str | None' = None, "
        "credentials: 'grpc.ChannelCredentials | None' = None, "
        "max_message_bytes: 'int' = 8388608, "
        "interceptors: 'Sequence[grpc.aio.ClientInterceptor]' = (), "
        "options: 'Sequence[tuple[str, Any]]' = ()) -> 'None'",
    ),
    "__aenter__": ("async", "(self) -> 'RouterClient'"),
    "__aexit__": (
        "async",
        "(self, exc_type: 'type[BaseException] | None', exc_value: 'BaseException | None', "
        "traceback: 'TracebackType | None') -> 'None'",
    ),
    "target": ("property", "(self) -> 'str'"),
    "inference": (
        "property",
        "(self) -> 'inference_service_pb2_grpc.InferenceServiceAsyncStub'",
    ),
    "control": (
        "property",
        "(self) -> 'model_control_service_pb2_grpc.ModelControlServiceAsyncStub'",
    ),
    "close": ("async", "(self) -> 'None'"),
    "wait_ready": ("async", "(self, timeout: 'float') -> 'None'"),
    "generate": (
        "method",
        "(self, model: 'str', body: 'Mapping[str, Any] | str', *, "
        "kind: 'GenerateKind' = 'chat', priority: 'Priority' = 'normal', "
        f"request_id: 'str | None' = None, {_TIMEOUT}, {_META}) "
        "-> 'AsyncGenerator[GenerateEvent, None]'",
    ),
    "complete": (
        "async",
        "(self, model: 'str', body: 'Mapping[str, Any] | str', *, "
        "kind: 'GenerateKind' = 'chat', priority: 'Priority' = 'normal', "
        f"request_id: 'str | None' = None, {_TIMEOUT}, {_META}) -> 'Completion'",
    ),
    "embed": (
        "async",
        "(self, model: 'str', inputs: 'Sequence[str] | Sequence[Sequence[int]]', *, "
        f"priority: 'Priority' = 'normal', request_id: 'str | None' = None, {_TIMEOUT}, "
        f"{_META}) -> 'EmbedResult'",
    ),
    "list_models": ("async", f"(self, *, {_TIMEOUT}, {_META}) -> 'ModelList'"),
    "get_model": ("async", f"(self, model: 'str', *, {_TIMEOUT}, {_META}) -> 'ModelInfo'"),
    "load": (
        "async",
        f"(self, model: 'str', *, wait: 'bool' = True, {_TIMEOUT}, {_META}) -> 'ModelInfo'",
    ),
    "unload": (
        "async",
        "(self, model: 'str', *, force: 'bool' = False, "
        f"drain_timeout: 'float | None' = None, {_TIMEOUT}, {_META}) -> 'ModelInfo'",
    ),
    "reset": ("async", f"(self, model: 'str', *, {_TIMEOUT}, {_META}) -> 'ModelInfo'"),
    "watch": (
        "method",
        f"(self, *, last_event_id: 'str | None' = None, {_TIMEOUT}, {_META}) "
        "-> 'AsyncGenerator[WatchEvent, None]'",
    ),
}
FUNCTIONS = {
    "from_rpc_error": "(error: 'grpc.aio.AioRpcError') -> 'RouterError'",
    "map_rpc_errors": "() -> 'Iterator[None]'",
}
_WHEN = "datetime | None"
DATACLASS_FIELDS: dict[str, list[tuple[str, str]]] = {
    "Chunk": [("data", "Sequence[str]"), ("text", "str")],
    "Completion": [("body", "str"), ("text", "str"), ("end", "End")],
    "EmbedResult": [
        ("embeddings", "list[list[float]]"),
        ("prompt_tokens", "int"),
        ("total_tokens", "int"),
    ],
    "End": [("finish_reason", "str"), ("usage", "Usage"), ("timing", "Timing")],
    "Loading": [("stage", "str"), ("elapsed_sec", "float")],
    "ModelInfo": [
        ("alias", "str"),
        ("state", "str"),
        ("kind", "str"),
        ("port", "int"),
        ("pid", "int"),
        ("slots", "int"),
        ("in_flight", "int"),
        ("queued", "int"),
        ("n_ctx", "int"),
        ("pinned", "bool"),
        ("last_error", "str"),
        ("state_since", _WHEN),
        ("last_used_at", _WHEN),
        ("retry_at", _WHEN),
        ("consecutive_failures", "int"),
        ("restarts", "int"),
        ("device", "str"),
        ("memory_estimate_mib", "int"),
        ("memory_measured_mib", "int"),
        ("load_seconds", "float"),
        ("ttl_sec", "int"),
        ("load_stage", "str"),
        ("created_at", _WHEN),
    ],
    "ModelList": [
        ("models", "Sequence[ModelInfo]"),
        ("server", "ServerInfo"),
        ("summary", "StatusSummary"),
    ],
    "Queued": [("position", "int"), ("queue_length", "int")],
    "ServerInfo": [
        ("state", "str"),
        ("started_at", _WHEN),
        ("epoch", "str"),
        ("version", "str"),
        ("cpu_mode", "bool"),
        ("updated_at", _WHEN),
    ],
    "StatusSummary": [("total", "int"), ("by_state", "Mapping[str, int]")],
    "Timing": [
        ("queue_ms", "float"),
        ("load_ms", "float"),
        ("ttft_ms", "float"),
        ("total_ms", "float"),
    ],
    "Usage": [
        ("prompt_tokens", "int"),
        ("completion_tokens", "int"),
        ("total_tokens", "int"),
        ("cached_tokens", "int"),
    ],
    "WatchEvent": [
        ("revision", "int"),
        ("event_id", "str"),
        ("kind", "WatchEventKind"),
        ("server", "ServerInfo | None"),
        ("models", "Sequence[ModelInfo]"),
        ("summary", "StatusSummary | None"),
        ("model", "ModelInfo | None"),
        ("timestamp", _WHEN),
        ("server_state", "str | None"),
    ],
}
LITERALS = {
    "GenerateKind": ("chat", "completion"),
    "Priority": ("high", "normal", "low"),
    "WatchEventKind": ("full_status", "model_update", "server_update", "heartbeat"),
}


def _public_members(cls: type) -> dict[str, tuple[str, str]]:
    members = {}
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__aenter__", "__aexit__"):
            continue
        if isinstance(member, property):
            assert member.fget is not None
            members[name] = ("property", str(inspect.signature(member.fget)))
        elif callable(member):
            kind = "async" if inspect.iscoroutinefunction(member) else "method"
            members[name] = (kind, str(inspect.signature(member)))
    return members


def test_router_client_signatures_are_pinned() -> None:
    assert _public_members(clients.RouterClient) == CLIENT_MEMBERS


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_signatures_are_pinned(name: str) -> None:
    assert str(inspect.signature(getattr(clients, name))) == FUNCTIONS[name]


def test_dataclass_fields_are_pinned() -> None:
    exported = {
        name: [(f.name, str(f.type)) for f in dataclasses.fields(value)]
        for name in clients.__all__
        if dataclasses.is_dataclass(value := getattr(clients, name))
    }
    assert exported == DATACLASS_FIELDS
    defaults = {
        name: {
            field.name: field.default
            for field in dataclasses.fields(getattr(clients, name))
            if field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        }
        for name in DATACLASS_FIELDS
    }
    # Only a watch event's kind-specific parts are optional (a heartbeat has no models).
    assert {name: d for name, d in defaults.items() if d} == {
        "WatchEvent": {
            "server": None,
            "models": (),
            "summary": None,
            "model": None,
            "timestamp": None,
            "server_state": None,
        }
    }


@pytest.mark.parametrize("name", sorted(LITERALS))
def test_literal_values_are_pinned(name: str) -> None:
    assert typing.get_args(getattr(clients, name)) == LITERALS[name]


def test_generate_event_union_is_pinned() -> None:
    assert typing.get_args(clients.GenerateEvent) == (
        clients.Queued,
        clients.Loading,
        clients.Chunk,
        clients.End,
    )
