"""The admin REST bridge: every seed path, body/query/path mapping, SSE, descriptor-only routes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2

from clients import RouterClient
from facade import bridge, status
from facade.app import create_app
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_pb2
from tests.clients.fake_router import make_model, rich_status
from tests.facade.conftest import Facade, facade_settings, mounted_routes
from tests.helpers import free_port

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
    # The status file route, not GetModel(model="file"): none is configured here.
    status_file = await models.http.get("/v1/models/status/file")
    # POST-only: not the OpenAI retrieve route reading "eject" as a model.
    eject = await models.http.get("/v1/models/eject")

    assert status_file.status == 404
    assert "no status file" in (await status_file.json())["error"]["message"]
    assert eject.status == 405
    assert (await eject.json())["error"]["message"] == (
        "Method GET is not allowed on /v1/models/eject"
    )
    assert [call.method for call in models.fake.calls] == [
        "ListModels",
        "ListFailedModels",
        "WatchModels",
    ]


async def test_the_methods_a_static_path_serves_still_reach_it(models: Facade) -> None:
    eject = await models.http.post("/v1/models/eject", json={"model": "chat"})
    retrieve = await models.http.get("/v1/models/chat")

    assert (eject.status, retrieve.status) == (200, 200)
    assert [call.method for call in models.fake.calls] == ["UnloadModel", "GetModel"]


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
        ("{not json", "not valid JSON"),
        # Before: parsed as {} (an action taken on a malformed body), or a 400 whose message
        # showed protobuf's or Python's internals.
        ("[1]", "must be a JSON object"),
        ("[]", "must be a JSON object"),
        ('{"\\ud800": 1}', "unpaired UTF-16 surrogate"),
        ('{"model": "\\udc00"}', "unpaired UTF-16 surrogate"),
        ('{"model": "chat", "force": ' + "1" * 5000 + "}", "too many digits"),
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


T0 = 1_780_000_000  # a fixed instant, 2026-05-28T20:26:40Z
T0_ISO = "2026-05-28T20:26:40+00:00"


def at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def watch_events() -> list[mpb.WatchModelsResponse]:
    server = model_pb2.ServerStatus(
        state=model_pb2.SERVER_STATE_SERVING,
        started_at=at(T0),
        epoch="ep",
        version="1.2.3",
        updated_at=at(T0 + 5),
    )
    stopped = make_model("chat", state=model_pb2.MODEL_STATE_STOPPED, n_ctx=4096, slots=2)
    ready = make_model(
        "embed",
        state=model_pb2.MODEL_STATE_READY,
        kind=model_pb2.MODEL_KIND_EMBEDDING,
        port=41001,
        pid=4242,
        slots=1,
        n_ctx=2048,
        state_since=at(T0 + 5),
        last_used_at=at(T0 + 4),
        device="cpu",
        memory_estimate_mib=300,
        memory_measured_mib=250,
        load_seconds=0.5,
        ttl_sec=600,
        load_stage=model_pb2.LOAD_STAGE_READY,
    )
    loading = make_model(
        "chat",
        state=model_pb2.MODEL_STATE_LOADING,
        port=41002,
        pid=4343,
        slots=2,
        n_ctx=4096,
        state_since=at(T0 + 6),
        device="cpu",
        memory_estimate_mib=120,
        load_stage=model_pb2.LOAD_STAGE_LOADING_WEIGHTS,
    )
    return [
        mpb.WatchModelsResponse(
            revision=7,
            event_id="ep-7",
            full_status=mpb.FullStatus(
                server=server,
                models=[stopped, ready],
                summary=model_pb2.StatusSummary(total=2, by_state={"stopped": 1, "ready": 1}),
            ),
        ),
        mpb.WatchModelsResponse(revision=8, event_id="ep-8", model_update=loading),
        mpb.WatchModelsResponse(
            revision=9,
            event_id="ep-9",
            server_update=model_pb2.ServerStatus(
                state=model_pb2.SERVER_STATE_SHUTTING_DOWN,
                started_at=at(T0),
                epoch="ep",
                version="1.2.3",
                updated_at=at(T0 + 7),
            ),
        ),
        mpb.WatchModelsResponse(
            revision=9,
            event_id="ep-9",
            heartbeat=mpb.Heartbeat(
                timestamp=at(T0 + 37), server_state=model_pb2.SERVER_STATE_SHUTTING_DOWN
            ),
        ),
    ]


def _ours(model: dict[str, Any]) -> dict[str, Any]:
    """Our fields of a seed model entry, with the defaults of an unloaded chat model."""
    return {
        "kind": "chat",
        "load_stage": "unspecified",
        "pid": 0,
        "slots": 2,
        "in_flight": 0,
        "queued": 0,
        "n_ctx": 4096,
        "pinned": False,
        "consecutive_failures": 0,
        "restarts": 0,
        "retry_at": None,
        "device": "",
        "memory_estimate_mib": 0,
        "memory_measured_mib": 0,
        "load_seconds": 0.0,
        "ttl_sec": 0,
        **model,
    }


# What a seed dashboard reads: the seed's names and words first, ours after them.
SEED_FULL_STATUS = {
    "server": {
        "status": "ready",
        "started_at": T0_ISO,
        "updated_at": "2026-05-28T20:26:45+00:00",
        "state": "serving",
        "version": "1.2.3",
        "epoch": "ep",
        "cpu_mode": False,
    },
    "models": {
        "chat": {
            "alias": "chat",
            "status": "off",
            "port": None,
            "started_at": None,
            "last_used_at": None,
            "load_progress": None,
            "error_message": None,
            "vram_used_mb": None,
            "updated_at": None,
            "state": "stopped",
            **_ours({}),
        },
        "embed": {
            "alias": "embed",
            "status": "ready",
            "port": 41001,
            "started_at": "2026-05-28T20:26:45+00:00",
            "last_used_at": "2026-05-28T20:26:44+00:00",
            "load_progress": 100,
            "error_message": None,
            "vram_used_mb": 250,
            "updated_at": "2026-05-28T20:26:45+00:00",
            "state": "ready",
            **_ours(
                {
                    "kind": "embedding",
                    "load_stage": "ready",
                    "pid": 4242,
                    "slots": 1,
                    "n_ctx": 2048,
                    "device": "cpu",
                    "memory_estimate_mib": 300,
                    "memory_measured_mib": 250,
                    "load_seconds": 0.5,
                    "ttl_sec": 600,
                }
            ),
        },
    },
    "summary": {
        "total": 2,
        "by_status": {"off": 1, "ready": 1},
        "by_state": {"ready": 1, "stopped": 1},
    },
}
SEED_MODEL_UPDATE = {
    "alias": "chat",
    "status": "loading",
    "port": 41002,
    "started_at": "2026-05-28T20:26:46+00:00",
    "last_used_at": None,
    "load_progress": 0,
    "error_message": None,
    "vram_used_mb": 120,
    "updated_at": "2026-05-28T20:26:46+00:00",
    "state": "loading",
    **_ours(
        {
            "load_stage": "loading_weights",
            "pid": 4343,
            "device": "cpu",
            "memory_estimate_mib": 120,
        }
    ),
}
SEED_SERVER_UPDATE = {
    "status": "shutting_down",
    "started_at": T0_ISO,
    "updated_at": "2026-05-28T20:26:47+00:00",
    "state": "shutting_down",
    "version": "1.2.3",
    "epoch": "ep",
    "cpu_mode": False,
}
SEED_HEARTBEAT = {
    "timestamp": "2026-05-28T20:27:17+00:00",
    "server_status": "shutting_down",
    "server_state": "shutting_down",
}


def frame(event: str, event_id: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":"))
    return f"event: {event}\nid: {event_id}\ndata: {data}\n\n".encode()


async def test_the_status_stream_keeps_the_seed_payloads(models: Facade) -> None:
    models.fake.watch_events = watch_events()

    response = await models.http.get("/v1/models/status/stream")

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await response.read() == (
        frame("full_status", "ep-7", SEED_FULL_STATUS)
        + frame("model_update", "ep-8", SEED_MODEL_UPDATE)
        + frame("server_update", "ep-9", SEED_SERVER_UPDATE)
        + frame("heartbeat", "ep-9", SEED_HEARTBEAT)
    )


def test_the_seed_js_example_reads_the_stream() -> None:
    """The seed README's dashboard: `data.alias, data.status` of a model_update, and
    `full_status.models` keyed by alias."""
    update = status.seed_status_frame(watch_events()[1]).decode()
    data = json.loads(update.split("data: ", 1)[1])
    snapshot = status.seed_status_frame(watch_events()[0]).decode()
    models = json.loads(snapshot.split("data: ", 1)[1])["models"]

    assert (data["alias"], data["status"]) == ("chat", "loading")
    assert models["embed"]["status"] == "ready" and models["chat"]["status"] == "off"


@pytest.mark.parametrize(
    ("state", "word"),
    [
        (model_pb2.MODEL_STATE_STOPPED, "off"),
        (model_pb2.MODEL_STATE_STARTING, "starting"),
        (model_pb2.MODEL_STATE_LOADING, "loading"),
        (model_pb2.MODEL_STATE_READY, "ready"),
        (model_pb2.MODEL_STATE_DRAINING, "stopping"),
        (model_pb2.MODEL_STATE_STOPPING, "stopping"),
        (model_pb2.MODEL_STATE_FAILED, "failed"),
    ],
)
def test_every_state_has_a_seed_word(state: model_pb2.ModelState.ValueType, word: str) -> None:
    event = mpb.WatchModelsResponse(event_id="ep-1", model_update=make_model("m", state=state))
    data = json.loads(status.seed_status_frame(event).decode().split("data: ", 1)[1])

    assert data["status"] == word
    assert data["state"] == model_pb2.ModelState.Name(state).removeprefix("MODEL_STATE_").lower()


def test_the_generic_bridge_frame_is_still_proto_json() -> None:
    """Streams the seed did not have keep the bridge's rendering; so does an event newer than
    the seed renderer knows."""
    update = watch_events()[1]
    generic = bridge.stream_frame(update).decode()
    data = json.loads(generic.split("data: ", 1)[1])
    unknown = mpb.WatchModelsResponse(revision=3, event_id="ep-3")

    assert generic.startswith("event: model_update\nid: ep-8\n")
    assert data["state"] == "MODEL_STATE_LOADING" and data["alias"] == "chat"
    assert status.seed_status_frame(unknown) == bridge.stream_frame(unknown)


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
    assert body == frame("full_status", "ep-7", SEED_FULL_STATUS) + (
        f"event: error\ndata: {json.dumps(error, separators=(',', ':'))}\n\n".encode()
    )


async def test_a_router_that_does_not_answer_gets_a_stream_an_event_source_retries(
    tmp_path: Path,
) -> None:
    # Before: a 503, after which an EventSource (a dashboard) gives up for good.
    async with RouterClient(f"127.0.0.1:{free_port()}") as client:
        app = create_app(facade_settings(tmp_path), client=client)
        async with TestClient(TestServer(app)) as http:
            response = await http.get("/v1/models/status/stream")
            body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    event, data = body.decode().split("\n", 1)
    assert event == "event: error"
    assert json.loads(data.removeprefix("data: "))["error"]["code"] == "router_unavailable"


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
