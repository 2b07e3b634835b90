"""GET /metrics on the facade: its own series, bounded labels, and the router's series appended."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from clients import RouterClient
from facade.app import create_app
from facade.keys import METRICS
from router.telemetry.metrics import RouterMetrics
from tests.clients.fake_router import (
    FakeRouter,
    chunk,
    make_model,
    rich_status,
    serve_fake_router,
)
from tests.helpers import chat_model, free_port, settings_for, wait_until

PROMTOOL = str(Path(sys.executable).parent / "promtool")
CHUNK = '{"id":"c1","object":"chat.completion.chunk","choices":[]}'
STREAM = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class RouterMetricsStub:
    """What the router's metrics port answers, and the headers it was sent."""

    status: int = 200
    body: bytes = field(
        default_factory=lambda: generate_latest(RouterMetrics(["chat"], ["chat"]).registry)
    )
    headers: list[dict[str, str]] = field(default_factory=list)


@dataclass
class MetricsFacade:
    http: TestClient[Any, Any]
    fake: FakeRouter

    def value(self, name: str, **labels: str) -> float:
        """A sample of the facade's own registry (None counts as 0)."""
        registry = self.http.app[METRICS].registry
        return registry.get_sample_value(name, labels) or 0.0

    async def scrape(self, **headers: str) -> tuple[int, str]:
        response = await self.http.get("/metrics", headers=headers)
        return response.status, await response.text()


MakeFacade = Callable[..., Awaitable[MetricsFacade]]


@pytest.fixture
async def make_facade(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, tmp_path: Path
) -> AsyncIterator[MakeFacade]:
    """`await make_facade(stub=...)`: a facade over a fake router; with `stub`, the router's
    metrics port is a server answering as the stub says (`router_port` overrides the port)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            stub: RouterMetricsStub | None = None,
            router_port: int | None = None,
            metrics_open: bool = True,
        ) -> MetricsFacade:
            telemetry: dict[str, Any] = {"metrics_open": metrics_open}
            if stub is not None:
                telemetry["metrics_port"] = (await aiohttp_server(_stub_app(stub))).port
            if router_port is not None:
                telemetry["metrics_port"] = router_port
            fake, target = await stack.enter_async_context(serve_fake_router())
            client = await stack.enter_async_context(RouterClient(target))
            settings = settings_for(
                tmp_path, {"chat": chat_model(tmp_path / "chat.gguf")}, telemetry=telemetry
            )
            app = create_app(settings, client=client)
            return MetricsFacade(await aiohttp_client(app), fake)

        yield make


def _stub_app(stub: RouterMetricsStub) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        stub.headers.append(dict(request.headers))
        return web.Response(status=stub.status, body=stub.body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def family_names(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]


def promtool_problems(text: str) -> str:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


# The facade's own series


async def test_without_a_router_port_the_facade_series_are_the_whole_answer(
    make_facade: MakeFacade,
) -> None:
    facade = await make_facade()

    status, text = await facade.scrape()

    assert status == 200
    names = family_names(text)
    assert names and all(name.startswith("routermodel_facade_") for name in names)
    assert "routermodel_facade_process_cpu_seconds_total" in names
    assert facade.value("routermodel_facade_router_metrics_up") == 0
    assert facade.fake.calls == []  # scraping asks the router for nothing (and loads nothing)


async def test_requests_are_counted_by_route_template_never_by_path(
    make_facade: MakeFacade,
) -> None:
    facade = await make_facade()

    assert (await facade.http.get("/v1/models/no-such-model")).status == 404
    assert (await facade.http.get("/v1/models")).status == 200
    assert (await facade.http.get("/no/such/route")).status == 404
    assert (await facade.http.request("PROPFIND", "/coffee")).status == 404
    _, text = await facade.scrape()

    requests = "routermodel_facade_http_requests_total"
    assert facade.value(requests, route="/v1/models/{model}", method="GET", status="4xx") == 1
    assert facade.value(requests, route="/v1/models", method="GET", status="2xx") == 1
    assert facade.value(requests, route="unmatched", method="GET", status="4xx") == 1
    assert facade.value(requests, route="unmatched", method="OTHER", status="4xx") == 1
    duration = "routermodel_facade_http_request_duration_seconds_count"
    assert facade.value(duration, route="/v1/models/{model}", method="GET") == 1
    for raw in ("no-such-model", "/no/such/route", "coffee", "PROPFIND"):
        assert raw not in text


async def test_a_route_gets_every_status_class_with_its_first_request(
    make_facade: MakeFacade,
) -> None:
    facade = await make_facade()
    facade.fake.models = {"chat": make_model("chat")}
    assert (await facade.http.get("/v1/models/chat")).status == 200
    _, before = await facade.scrape()

    await facade.http.get("/v1/models/unknown-one")  # a 404 on a route already seen
    await facade.http.get("/v1/models/unknown-two")
    _, after = await facade.scrape()

    route = ("route", "/v1/models/{model}")
    statuses = {
        dict(labels)["status"]
        for (name, labels), _ in samples(before).items()
        if name == "routermodel_facade_http_requests_total" and route in labels
    }
    assert statuses == {"2xx", "4xx", "5xx", "cancelled"}
    assert set(samples(after)) == set(samples(before))


async def test_open_streams_in_flight_and_disconnects(make_facade: MakeFacade) -> None:
    facade = await make_facade()
    facade.fake.generate_events = [chunk(CHUNK)]
    facade.fake.hold_streams_open = True

    response = await facade.http.post("/v1/chat/completions", json=STREAM)
    await response.content.readuntil(b"\n\n")
    assert facade.value("routermodel_facade_sse_streams_open") == 1
    assert facade.value("routermodel_facade_http_requests_in_flight") == 1
    response.close()
    await asyncio.wait_for(facade.fake.cancelled.wait(), timeout=1)
    # The handler unwinds after the router call is cancelled.
    await wait_until(
        lambda: (
            facade.value("routermodel_facade_sse_streams_open") == 0
            and facade.value("routermodel_facade_http_requests_in_flight") == 0
        ),
        5,
    )

    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert facade.value("routermodel_facade_client_disconnects_total", **route) == 1
    assert facade.value("routermodel_facade_http_requests_total", **route, status="cancelled") == 1


# The router's series, appended


async def test_one_scrape_carries_both_processes_each_family_once(
    make_facade: MakeFacade,
) -> None:
    stub = RouterMetricsStub()
    facade = await make_facade(stub)
    await facade.http.get("/v1/models")

    status, text = await facade.scrape()

    assert status == 200
    names = family_names(text)
    duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
    assert duplicates == []
    assert "routermodel_requests_total" in names
    assert "routermodel_router_process_cpu_seconds_total" in names
    assert "routermodel_facade_http_requests_total" in names
    assert facade.value("routermodel_facade_router_metrics_up") == 1
    assert promtool_problems(text) == ""


async def test_the_callers_key_goes_to_the_router(make_facade: MakeFacade) -> None:
    stub = RouterMetricsStub()
    facade = await make_facade(stub)

    await facade.scrape(Authorization="Bearer sk-monitor")
    await facade.scrape(**{"X-API-Key": "sk-other"})

    assert stub.headers[0]["Authorization"] == "Bearer sk-monitor"
    assert stub.headers[1]["X-API-Key"] == "sk-other"


@pytest.mark.parametrize(
    ("router_status", "error_type"),
    [(401, "authentication_error"), (403, "permission_error")],
)
async def test_a_refusal_by_the_router_is_the_answer(
    make_facade: MakeFacade, router_status: int, error_type: str
) -> None:
    facade = await make_facade(RouterMetricsStub(status=router_status, body=b"no\n"))

    response = await facade.http.get("/metrics")

    assert response.status == router_status
    assert (await response.json())["error"]["type"] == error_type


async def test_an_unreachable_router_leaves_the_facade_series(make_facade: MakeFacade) -> None:
    facade = await make_facade(router_port=free_port())

    status, text = await facade.scrape()

    assert status == 200
    assert all(name.startswith("routermodel_facade_") for name in family_names(text))
    assert facade.value("routermodel_facade_router_metrics_up") == 0


async def test_a_failing_router_leaves_the_facade_series(make_facade: MakeFacade) -> None:
    facade = await make_facade(RouterMetricsStub(status=500, body=b"broken"))

    status, text = await facade.scrape()

    assert status == 200
    assert "broken" not in text
    assert facade.value("routermodel_facade_router_metrics_up") == 0


async def test_protected_metrics_ask_the_router_about_the_key_even_without_its_port(
    make_facade: MakeFacade,
) -> None:
    facade = await make_facade(metrics_open=False)
    facade.fake.errors["GetQueueStats"] = rich_status(
        grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required", reason="UNAUTHENTICATED"
    )

    status, text = await facade.scrape()

    assert status == 401 and "routermodel_facade" not in text
    [call] = [c for c in facade.fake.calls if c.method == "GetQueueStats"]
    assert call.header("authorization") == []
    del facade.fake.errors["GetQueueStats"]
    status, text = await facade.scrape(Authorization="Bearer monitor-key")
    assert status == 200 and "routermodel_facade_http_requests_total" in text
    assert facade.fake.calls[-1].header("authorization") == ["Bearer monitor-key"]
