"""The admin REST bridge: every seed path, body/query/path mapping, SSE, descriptor-only routes."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool

from facade import bridge
from facade.app import create_app
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_pb2
from tests.clients.fake_router import make_model, rich_status
from tests.facade.conftest import Facade, facade_settings, mounted_routes

# (HTTP method, path, body) -> (RPC, request fields): every seed management path, plus ours.
SEED_PATHS: list[Any] = [
    ("GET", "/v1/models/status", None, "ListModels", {}),
    ("GET", "/v1/models/status/chat", None, "GetModel", {"model": "chat"}),
    ("GET", "/v1/models/chat/status", None, "GetModel", {"model": "chat"}),
    ("GET", "/v1/models/failed", None, "ListFailedModels", {}),
    ("POST", "/v1/models/eject", {"model": "chat"}, "UnloadModel", {"model": "chat"}),
    (
        "POST",
        "/v1/models/chat/unload",
        {"force": True},
        "UnloadModel",
        {"model": "chat", "force": True},
    ),
    ("POST", "/v1/models/chat/reset", None, "ResetModel", {"model": "chat"}),
    (
        "POST",
        "/v1/models/chat/load",
        {"wait": True, "timeout_sec": 5},
        "LoadModel",
        {"model": "chat", "wait": True, "timeout_sec": 5.0},
    ),
    ("GET", "/v1/queue/stats", None, "GetQueueStats", {}),
    ("GET", "/vram", None, "GetResources", {"model": ""}),
    ("GET", "/vram/summary", None, "GetResources", {"model": ""}),
    ("GET", "/vram/models/chat", None, "GetResources", {"model": "chat"}),
    ("GET", "/v1/health/models", None, "GetModelHealth", {}),
    ("GET", "/v1/models/chat/logs?lines=5", None, "GetModelLogs", {"model": "chat", "lines": 5}),
]


@pytest.fixture
def models(facade: Facade) -> Facade:
    facade.fake.models = {"chat": make_model("chat", n_ctx=4096)}
    return facade


def request_fields(message: Any) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


@pytest.mark.parametrize(("method", "path", "body", "rpc", "fields"), SEED_PATHS)
async def test_every_seed_path_reaches_its_rpc(
    models: Facade,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    rpc: str,
    fields: dict[str, Any],
) -> None:
    response = await models.http.request(method, path, json=body)

    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    (call,) = models.fake.calls
    assert call.method == rpc
    assert {name: getattr(call.request, name) for name in fields} == fields
    assert set(request_fields(call.request)) <= set(fields)


async def test_static_paths_win_over_model_templates(models: Facade) -> None:
    for path in ("/v1/models/status", "/v1/models/failed"):
        assert (await models.http.get(path)).status == 200
    stream = await models.http.get("/v1/models/status/stream")
    await stream.read()

    assert [call.method for call in models.fake.calls] == [
        "ListModels",
        "ListFailedModels",
        "WatchModels",
    ]


async def test_responses_are_proto_json_with_snake_case_and_defaults(models: Facade) -> None:
    response = await models.http.get("/v1/models/status/chat")

    model = (await response.json())["model"]
    assert model["alias"] == "chat"
    assert model["state"] == "MODEL_STATE_READY"
    assert model["n_ctx"] == 4096
    # Default values are printed, with proto names.
    assert (model["in_flight"], model["pinned"], model["last_error"]) == (0, False, "")
    assert "state_since" not in model  # an unset timestamp has presence: absent


async def test_an_unknown_model_maps_through_the_error_table(models: Facade) -> None:
    response = await models.http.get("/v1/models/nope/status")

    assert response.status == 404
    assert (await response.json())["error"]["code"] == "model_not_found"


async def test_the_path_wins_over_the_body(models: Facade) -> None:
    response = await models.http.post("/v1/models/chat/load", json={"model": "other"})

    assert response.status == 200
    assert request_fields(models.fake.calls[0].request) == {"model": "chat"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"model": "chat", "colour": "red"}', "colour"),
        ('{"model": "chat", "force": "yes"}', "force"),
        ("{not json", "invalid request body"),
        ("[1]", "invalid request body"),
    ],
)
async def test_bad_bodies_are_400(models: Facade, body: str, message: str) -> None:
    response = await models.http.post("/v1/models/eject", data=body)

    assert response.status == 400
    assert message in (await response.json())["error"]["message"]
    assert models.fake.calls == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?colour=red", "unknown query parameter 'colour'"),
        ("?lines=many", "invalid value"),
        ("?lines=5&lines=6", "more than once"),
        ("?lines=99999999999", "out of range"),
    ],
)
async def test_bad_query_parameters_are_400(models: Facade, query: str, message: str) -> None:
    response = await models.http.get("/v1/models/chat/logs" + query)

    assert response.status == 400
    assert message in (await response.json())["error"]["message"]


async def test_body_rpcs_take_no_query_parameters(models: Facade) -> None:
    response = await models.http.post("/v1/models/chat/load?wait=true", json={})

    assert response.status == 400
    assert (await response.json())["error"]["param"] == "wait"


# Server streaming as SSE


def watch_events() -> list[mpb.WatchModelsResponse]:
    model = make_model("chat", state=model_pb2.MODEL_STATE_LOADING)
    return [
        mpb.WatchModelsResponse(
            revision=7,
            event_id="ep-7",
            full_status=mpb.FullStatus(
                models=[make_model("chat", state=model_pb2.MODEL_STATE_STOPPED)]
            ),
        ),
        mpb.WatchModelsResponse(revision=8, event_id="ep-8", model_update=model),
        mpb.WatchModelsResponse(
            revision=8,
            event_id="ep-8",
            heartbeat=mpb.Heartbeat(server_state=model_pb2.SERVER_STATE_SERVING),
        ),
    ]


def frame(event: str, event_id: str, payload: Any) -> bytes:
    data = json.dumps(bridge.message_json(payload), separators=(",", ":"))
    return f"event: {event}\nid: {event_id}\ndata: {data}\n\n".encode()


async def test_the_status_stream_is_sse_named_by_the_oneof(models: Facade) -> None:
    events = watch_events()
    models.fake.watch_events = events

    response = await models.http.get("/v1/models/status/stream")

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await response.read() == (
        frame("full_status", "ep-7", events[0].full_status)
        + frame("model_update", "ep-8", events[1].model_update)
        + frame("heartbeat", "ep-8", events[2].heartbeat)
    )
    data = json.loads(frame("model_update", "ep-8", events[1].model_update).split(b"data: ")[1])
    assert data["alias"] == "chat" and data["state"] == "MODEL_STATE_LOADING"


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Last-Event-ID": "ep-3"}, "", "ep-3"),
        ({}, "?last_event_id=ep-4", "ep-4"),
        ({"Last-Event-ID": "ep-5"}, "?last_event_id=ep-4", "ep-5"),
        ({}, "", ""),
    ],
)
async def test_the_stream_resumes_from_the_last_event_id(
    models: Facade, headers: dict[str, str], query: str, expected: str
) -> None:
    response = await models.http.get("/v1/models/status/stream" + query, headers=headers)
    await response.read()

    request = models.fake.calls[0].request
    assert isinstance(request, mpb.WatchModelsRequest)
    assert request.last_event_id == expected


async def test_a_stream_failure_is_an_error_event(models: Facade) -> None:
    events = watch_events()[:1]
    models.fake.watch_events = events
    models.fake.errors["WatchModels"] = rich_status(
        grpc.StatusCode.UNAVAILABLE, "router stopping", reason="SHUTTING_DOWN"
    )

    body = await (await models.http.get("/v1/models/status/stream")).read()

    error = {
        "error": {
            "message": "router stopping",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert body == frame("full_status", "ep-7", events[0].full_status) + (
        f"event: error\ndata: {json.dumps(error, separators=(',', ':'))}\n\n".encode()
    )


async def test_a_stream_refused_at_once_keeps_its_status(models: Facade) -> None:
    models.fake.errors["WatchModels"] = rich_status(
        grpc.StatusCode.PERMISSION_DENIED, "needs the monitor scope", reason="PERMISSION_DENIED"
    )

    response = await models.http.get("/v1/models/status/stream")

    assert response.status == 403


# The route table comes from descriptors only

STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


def ping_service() -> Any:
    """A service that exists nowhere in the code: one annotated RPC with two bindings."""
    file = descriptor_pb2.FileDescriptorProto(
        name="routermodel_test/ping.proto",
        package="routermodel.test.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    for name in ("PingRequest", "PingResponse"):
        message = file.message_type.add(name=name)
        message.field.add(name="name", number=1, type=STRING, label=OPTIONAL)
        message.field.add(name="tags", number=2, type=STRING, label=REPEATED)
    method = file.service.add(name="PingService").method.add(
        name="Ping",
        input_type=".routermodel.test.v1.PingRequest",
        output_type=".routermodel.test.v1.PingResponse",
    )
    rule = http_pb2.HttpRule(get="/v1/ping/{name}")
    rule.additional_bindings.add(post="/v1/ping", body="*")
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    pool = descriptor_pool.DescriptorPool()
    for dependency in (descriptor_pb2, http_pb2, annotations_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(file.SerializeToString())
    return pool.FindServiceByName("routermodel.test.v1.PingService")


def test_an_annotated_rpc_becomes_routes_with_no_code() -> None:
    app = web.Application()

    bridge.setup_routes(app, ping_service())

    assert mounted_routes(app) == {
        ("GET", "/v1/ping/{name}"),
        ("POST", "/v1/ping"),
    }


def test_every_binding_of_the_real_service_is_mounted(tmp_path: Any) -> None:
    app = create_app(facade_settings(tmp_path))
    mounted = mounted_routes(app)

    expected = {(binding.http_method, binding.path) for binding in bridge.bindings()}

    assert expected <= mounted
    seed = {
        (method, path.split("?")[0].replace("chat", "{model}")) for method, path, *_ in SEED_PATHS
    }
    assert seed <= expected


def test_bindings_keep_templates_and_bodies() -> None:
    found = {(b.method.name, b.http_method, b.template, b.body) for b in bridge.bindings()}

    assert ("UnloadModel", "POST", "/v1/models/eject", "*") in found
    assert ("UnloadModel", "POST", "/v1/models/{model}/unload", "*") in found
    assert ("GetResources", "GET", "/vram/models/{model}", "") in found
    assert ("WatchModels", "GET", "/v1/models/status/stream", "") in found


async def test_a_repeated_query_parameter_fills_a_repeated_field() -> None:
    (get, _) = bridge.bindings(ping_service())
    request = make_mocked_request(
        "GET", "/v1/ping/x?tags=a&tags=b", match_info={"name": "x"}, app=web.Application()
    )

    message = await bridge.build_request(request, get)

    assert (message.name, list(message.tags)) == ("x", ["a", "b"])  # type: ignore[attr-defined]
