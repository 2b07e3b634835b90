"""The one error table: every row, aiohttp's own errors, and the body limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from pytest_aiohttp import AiohttpClient

from clients import RouterClient
from facade.app import create_app
from facade.errors import ERROR_TABLE
from tests.clients.fake_router import chunk, end, rich_status
from tests.facade.conftest import Facade, MakeFacade, facade_settings
from tests.helpers import free_port

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

# (status from the router, its ErrorInfo reason, metadata, RetryInfo) ->
# (HTTP status, error.type, error.code, Retry-After)
ROWS: list[Any] = [
    pytest.param(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", {}, None,
        400, "invalid_request_error", None, None, id="invalid-request",
    ),
    pytest.param(
        grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED",
        {"upstream_status": "400", "upstream_type": "exceed_context_size_error"}, None,
        400, "invalid_request_error", "context_length_exceeded", None, id="context-too-long",
    ),
    pytest.param(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "", {}, None,
        413, "invalid_request_error", "request_too_large", None, id="message-too-large",
    ),
    pytest.param(
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", {}, None,
        401, "authentication_error", "invalid_api_key", None, id="unauthenticated",
    ),
    pytest.param(
        grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", {}, None,
        403, "permission_error", "permission_denied", None, id="permission-denied",
    ),
    pytest.param(
        grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", {"model": "chat"}, None,
        404, "invalid_request_error", "model_not_found", None, id="model-not-found",
    ),
    pytest.param(
        grpc.StatusCode.FAILED_PRECONDITION, "WRONG_MODEL_KIND", {}, None,
        400, "invalid_request_error", "wrong_model_kind", None, id="wrong-model-kind",
    ),
    pytest.param(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", {}, 2.5,
        429, "rate_limit_error", "queue_full", "3", id="queue-full",
    ),
    pytest.param(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", {}, None,
        429, "rate_limit_error", "rate_limit_exceeded", "1", id="rate-limited",
    ),
    pytest.param(
        grpc.StatusCode.UNAVAILABLE, "LOAD_FAILED", {}, 30,
        503, "server_error", "load_failed", "30", id="load-failed",
    ),
    pytest.param(
        grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN", {}, 12,
        503, "server_error", "circuit_open", "12", id="circuit-open",
    ),
    pytest.param(
        grpc.StatusCode.UNAVAILABLE, "", {}, None,
        503, "server_error", "router_unavailable", "1", id="router-unreachable",
    ),
    pytest.param(
        grpc.StatusCode.DEADLINE_EXCEEDED, "QUEUE_TIMEOUT", {}, None,
        504, "timeout_error", "queue_timeout", None, id="queue-timeout",
    ),
    pytest.param(
        grpc.StatusCode.CANCELLED, "", {}, None,
        503, "server_error", "cancelled", "1", id="cancelled",
    ),
    pytest.param(
        grpc.StatusCode.INTERNAL, "INTERNAL", {}, None,
        500, "server_error", None, None, id="internal",
    ),
    pytest.param(
        grpc.StatusCode.UNKNOWN, "", {}, None,
        500, "server_error", None, None, id="unknown",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "reason", "metadata", "retry", "status", "error_type", "error_code", "retry_after"),
    ROWS,
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_every_row_of_the_error_table(
    facade: Facade,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
    retry: float | None,
    status: int,
    error_type: str,
    error_code: str | None,
    retry_after: str | None,
    stream: bool,
) -> None:
    message = "router says no (/srv/models/x.gguf)"
    facade.fake.errors["Generate" if stream else "Complete"] = rich_status(
        code, message, reason=reason, metadata=metadata, retry_after=retry
    )

    response = await facade.http.post("/v1/chat/completions", json={**CHAT, "stream": stream})

    assert response.status == status
    assert response.headers.get("Retry-After") == retry_after
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (error_type, error_code, None)
    # A 500 never repeats what the router or the transport said, nor does any failure of the
    # transport itself (no reason: gRPC's text names addresses); the router's own messages pass.
    if status == 500:
        assert error["message"] == "internal server error"
    elif not reason:
        assert error["message"].startswith("the router") or "too large" in error["message"]
    else:
        assert error["message"] == message


def test_the_table_has_a_row_per_client_error_class() -> None:
    import clients

    classes = {row[0] for row in ERROR_TABLE}
    errors = {
        value
        for value in vars(clients).values()
        if isinstance(value, type) and issubclass(value, clients.RouterError)
    }
    assert errors - {clients.RouterError} == classes


async def test_a_unary_call_maps_the_same_way(facade: Facade) -> None:
    facade.fake.errors["Embed"] = rich_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        "model 'chat' does not serve embeddings",
        reason="WRONG_MODEL_KIND",
    )

    response = await facade.http.post("/v1/embeddings", json={"model": "chat", "input": "x"})

    assert response.status == 400
    assert (await response.json())["error"]["code"] == "wrong_model_kind"


# aiohttp's own errors get the envelope too


async def test_an_unknown_route_is_a_404_envelope(facade: Facade) -> None:
    response = await facade.http.post("/v1/nowhere", json={})

    assert response.status == 404
    assert await response.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/nowhere)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


async def test_a_wrong_method_is_a_405_envelope(facade: Facade) -> None:
    response = await facade.http.get("/v1/chat/completions")

    assert response.status == 405
    assert (await response.json())["error"]["type"] == "invalid_request_error"


@pytest.fixture
async def small_limit(make_facade: MakeFacade) -> Facade:
    return await make_facade(api={"max_body_bytes": 1024})


async def test_a_body_over_the_limit_is_413(small_limit: Facade) -> None:
    body = {**CHAT, "padding": "x" * 2000}

    response = await small_limit.http.post("/v1/chat/completions", json=body)

    assert response.status == 413
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "1024" in error["message"]
    assert small_limit.fake.calls == []


async def test_a_chunked_body_over_the_limit_is_413(small_limit: Facade) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}]}'

    response = await small_limit.http.post("/v1/chat/completions", data=chunks())

    assert response.status == 413
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert small_limit.fake.calls == []


async def test_a_body_at_the_limit_is_accepted(small_limit: Facade) -> None:
    text = '{"model": "chat", "messages": [{"role": "user", "content": "'
    text += "x" * (1024 - len(text) - 4) + '"}]}'
    assert len(text) == 1024
    small_limit.fake.generate_events = [chunk('{"id":"x"}'), end()]

    response = await small_limit.http.post("/v1/chat/completions", data=text)

    assert response.status == 200


async def test_an_unreachable_router_is_503(aiohttp_client: AiohttpClient, tmp_path: Any) -> None:
    async with RouterClient(f"127.0.0.1:{free_port()}") as client:
        http = await aiohttp_client(create_app(facade_settings(tmp_path), client=client))

        response = await http.get("/v1/models")

        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "router_unavailable"
