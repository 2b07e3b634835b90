"""GET /metrics/stream (periodic SSE snapshots) and GET /v1/models/status/file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from clients import RouterClient
from facade import status
from facade.app import create_app
from facade.keys import METRICS
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_pb2
from tests.clients.fake_router import make_model, rich_status, serve_fake_router
from tests.facade.conftest import Facade
from tests.helpers import chat_model, settings_for

KEY = "sk-monitor-key"
MakeFacade = Callable[..., Awaitable[Facade]]


@pytest.fixture
async def make_facade(aiohttp_client: AiohttpClient, tmp_path: Path) -> AsyncIterator[MakeFacade]:
    """`await make_facade(**sections)`: a facade over a fresh fake router, config `sections`."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**sections: Any) -> Facade:
            fake, target = await stack.enter_async_context(serve_fake_router())
            client = await stack.enter_async_context(RouterClient(target))
            settings = settings_for(
                tmp_path, {"chat": chat_model(tmp_path / "chat.gguf")}, **sections
            )
            return Facade(await aiohttp_client(create_app(settings, client=client)), fake)

        yield make


def stats(**figures: Any) -> mpb.TelemetryStats:
    return mpb.TelemetryStats(**figures)


def script_router(facade: Facade) -> None:
    fake = facade.fake
    fake.server.started_at.FromSeconds(int(time.time()) - 60)
    fake.models = {
        "chat": make_model(
            "chat", port=4242, slots=2, in_flight=1, queued=3, memory_estimate_mib=90
        ),
        "embed": make_model(
            "embed", state=model_pb2.MODEL_STATE_STOPPED, kind=model_pb2.MODEL_KIND_EMBEDDING
        ),
    }
    fake.responses["GetTelemetrySummary"] = mpb.GetTelemetrySummaryResponse(
        window_sec=300,
        total=stats(requests=5, errors_4xx=1, error_rate=0.2, latency_p50_ms=12.5),
        per_model={"chat": stats(requests=5, errors_4xx=1, error_rate=0.2, tokens_per_second=41.5)},
    )
    fake.responses["GetResources"] = mpb.GetResourcesResponse(
        cpu_mode=True, devices=[mpb.Device(id="cpu", name="host", total_mib=8000, used_mib=2000)]
    )


async def next_event(response: ClientResponse) -> tuple[str, dict[str, Any]]:
    frame = (await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=2)).decode()
    fields = dict(line.split(": ", 1) for line in frame.strip().splitlines())
    return fields["event"], json.loads(fields["data"])


# /metrics/stream


async def test_the_first_snapshot_comes_at_once_with_numbers_as_numbers(
    make_facade: MakeFacade,
) -> None:
    facade = await make_facade()
    script_router(facade)

    response = await facade.http.get("/metrics/stream")
    event, snapshot = await next_event(response)

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert event == "metrics"
    assert snapshot["server"]["status"] == "serving"
    assert 59 <= snapshot["server"]["uptime_seconds"] < 70
    assert snapshot["devices"][0]["total_mib"] == 8000
    chat, embed = snapshot["models"]
    assert chat["alias"] == "chat" and chat["status"] == "ready" and chat["kind"] == "chat"
    assert (chat["port"], chat["slots"], chat["in_flight"], chat["queued"]) == (4242, 2, 1, 3)
    assert chat["memory_mib"] == 90
    assert chat["requests"] == 5 and chat["error_rate"] == 0.2 and chat["tokens_per_second"] == 41.5
    assert embed["status"] == "stopped" and embed["kind"] == "embedding" and embed["requests"] == 0
    assert snapshot["totals"]["latency_p50_ms"] == 12.5
    assert snapshot["window_sec"] == 300
    assert facade.http.app[METRICS].registry.get_sample_value("routermodel_facade_sse_streams_open")
    response.close()


async def test_snapshots_repeat_and_a_silent_router_gives_heartbeats(
    make_facade: MakeFacade, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "METRICS_INTERVAL_SEC", 0.05)
    facade = await make_facade()
    script_router(facade)
    response = await facade.http.get("/metrics/stream")
    assert (await next_event(response))[0] == "metrics"
    assert (await next_event(response))[0] == "metrics"

    facade.fake.errors["GetResources"] = rich_status(grpc.StatusCode.UNAVAILABLE, "router away")
    while (found := await next_event(response))[0] == "metrics":
        pass  # one already on its way
    event, heartbeat = found

    assert event == "heartbeat"
    assert heartbeat["router_connected"] is False and heartbeat["timestamp"]
    del facade.fake.errors["GetResources"]
    assert (await next_event(response))[0] == "metrics"
    response.close()


async def test_the_callers_key_reaches_every_call(make_facade: MakeFacade) -> None:
    facade = await make_facade()
    script_router(facade)

    response = await facade.http.get("/metrics/stream", headers={"Authorization": f"Bearer {KEY}"})
    await next_event(response)
    response.close()

    methods = {call.method for call in facade.fake.calls}
    assert methods == {"ListModels", "GetTelemetrySummary", "GetResources"}
    assert all(call.header("authorization") == [f"Bearer {KEY}"] for call in facade.fake.calls)


async def test_a_refused_key_is_the_http_answer(make_facade: MakeFacade) -> None:
    facade = await make_facade()
    script_router(facade)
    facade.fake.errors["ListModels"] = rich_status(
        grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required", reason="UNAUTHENTICATED"
    )

    response = await facade.http.get("/metrics/stream")

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_api_key"


# /v1/models/status/file


async def test_no_status_file_configured_is_a_404(make_facade: MakeFacade) -> None:
    facade = await make_facade()

    response = await facade.http.get("/v1/models/status/file")

    assert response.status == 404
    assert "no status file is configured" in (await response.json())["error"]["message"]


async def test_a_status_file_not_written_yet_is_a_404(
    make_facade: MakeFacade, tmp_path: Path
) -> None:
    path = tmp_path / "status" / "model_status.json"
    facade = await make_facade(telemetry={"model_status_path": str(path)})

    response = await facade.http.get("/v1/models/status/file")

    assert response.status == 404
    assert "not been written" in (await response.json())["error"]["message"]


async def test_the_status_file_is_served_as_written(
    make_facade: MakeFacade, tmp_path: Path
) -> None:
    path = tmp_path / "model_status.json"
    path.write_text('{"server": {"status": "serving"}, "models": {}}')
    facade = await make_facade(telemetry={"model_status_path": str(path)})
    facade.fake.errors["ListModels"] = rich_status(grpc.StatusCode.UNAVAILABLE, "router down")

    response = await facade.http.get("/v1/models/status/file")

    assert response.status == 200  # no keys configured: no need to ask the (absent) router
    assert response.content_type == "application/json"
    assert await response.read() == path.read_bytes()
    assert facade.fake.calls == []


async def test_with_keys_the_router_must_accept_the_callers_key(
    make_facade: MakeFacade, tmp_path: Path
) -> None:
    path = tmp_path / "model_status.json"
    path.write_text("{}")
    facade = await make_facade(
        telemetry={"model_status_path": str(path)}, auth={"api_keys": [{"key": KEY}]}
    )

    allowed = await facade.http.get(
        "/v1/models/status/file", headers={"Authorization": f"Bearer {KEY}"}
    )
    facade.fake.errors["GetQueueStats"] = rich_status(
        grpc.StatusCode.PERMISSION_DENIED, "this key lacks the scope", reason="PERMISSION_DENIED"
    )
    refused = await facade.http.get("/v1/models/status/file")

    assert allowed.status == 200
    # The file shows every alias and port: the key is checked on a monitor-scope call.
    assert facade.fake.calls[0].method == "GetQueueStats"
    assert facade.fake.calls[0].header("authorization") == [f"Bearer {KEY}"]
    assert refused.status == 403
