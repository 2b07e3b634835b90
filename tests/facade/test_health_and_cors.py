"""GET /health, and CORS when (and only when) origins are configured."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from pytest_aiohttp import AiohttpClient

from clients import RouterClient
from facade.app import create_app, router_target
from router.config import GrpcConfig
from tests.clients.fake_router import chunk, end, rich_status
from tests.facade.conftest import Facade, MakeFacade, facade_settings
from tests.helpers import free_port

ORIGIN = "http://dashboard.example"


async def test_health_is_ok_when_the_router_answers(facade: Facade) -> None:
    response = await facade.http.get("/health")

    assert response.status == 200
    assert await response.json() == {"status": "ok", "router": {"connected": True}}
    assert [call.method for call in facade.fake.calls] == ["ListModels"]


async def test_a_router_that_refuses_still_answers(facade: Facade) -> None:
    facade.fake.errors["ListModels"] = rich_status(
        grpc.StatusCode.UNAUTHENTICATED, "no key", reason="UNAUTHENTICATED"
    )

    response = await facade.http.get("/health")

    assert response.status == 200


async def test_health_is_degraded_without_a_router(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    async with RouterClient(f"127.0.0.1:{free_port()}") as client:
        http = await aiohttp_client(create_app(facade_settings(tmp_path), client=client))

        response = await http.get("/health")

        assert response.status == 503
        assert await response.json() == {"status": "degraded", "router": {"connected": False}}


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("0.0.0.0", "127.0.0.1:50051"),
        ("::", "[::1]:50051"),
        ("::1", "[::1]:50051"),
        ("localhost", "localhost:50051"),
    ],
)
def test_the_router_target_reaches_a_wildcard_bind_on_loopback(host: str, target: str) -> None:
    assert router_target(GrpcConfig(host=host, port=50051)) == target


# CORS


async def test_no_cors_headers_without_configured_origins(facade: Facade) -> None:
    response = await facade.http.get("/health", headers={"Origin": ORIGIN})
    preflight = await facade.http.options(
        "/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )

    assert "Access-Control-Allow-Origin" not in response.headers
    assert preflight.status == 405
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.fixture
async def cors(make_facade: MakeFacade) -> Facade:
    return await make_facade(api={"cors_origins": [ORIGIN]})


async def test_a_listed_origin_gets_cors_headers(cors: Facade) -> None:
    response = await cors.http.get("/health", headers={"Origin": ORIGIN})

    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    assert "Origin" in response.headers.getall("Vary")


async def test_another_origin_gets_none(cors: Facade) -> None:
    response = await cors.http.get("/health", headers={"Origin": "http://evil.example"})
    no_origin = await cors.http.get("/health")

    assert "Access-Control-Allow-Origin" not in response.headers
    # Still an answer that depends on the Origin header: a cache must not hand it to the
    # listed origin (before: no Vary on these two).
    assert "Origin" in response.headers.getall("Vary")
    assert "Origin" in no_origin.headers.getall("Vary")


async def test_a_preflight_is_answered(cors: Facade) -> None:
    response = await cors.http.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )

    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert cors.fake.calls == []


async def test_streams_and_errors_get_cors_headers(cors: Facade) -> None:
    cors.fake.generate_events = [chunk('{"id":"c"}'), end()]
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    stream = await cors.http.post("/v1/chat/completions", json=body, headers={"Origin": ORIGIN})
    error = await cors.http.get("/nowhere", headers={"Origin": ORIGIN})

    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert error.status == 404
    assert error.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_a_star_allows_every_origin(make_facade: MakeFacade) -> None:
    facade = await make_facade(api={"cors_origins": ["*"]})

    response = await facade.http.get("/health", headers={"Origin": "http://any.example"})

    assert response.headers["Access-Control-Allow-Origin"] == "*"
