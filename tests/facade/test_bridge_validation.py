"""Durations of the admin bridge (`timeout_sec`, `drain_timeout_sec`): a 400 in OpenAI's envelope.

Proto-JSON accepts the strings "NaN", "Infinity" and "-Infinity" for a double, so the router
itself must refuse them. These tests run the facade in-process over a real router process (with a
fake llama-server child): a fake router would not show what the router does with the value.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from clients import RouterClient
from facade.app import create_app
from router.config import load_settings
from tests.helpers import fake_server, free_port, router_process, write_config

# Each proto-JSON spelling of a value that is not a finite duration >= 0.
BAD_SECONDS: list[Any] = ["NaN", "Infinity", "-Infinity", -1]
# Against a router that accepted NaN, the call hung: bound each request so the test fails.
REQUEST_TIMEOUT = 10


@pytest.fixture
async def over_real_router(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_chat: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    """The facade app over a real router process serving `chat` from the fake llama-server."""
    port = free_port()
    config = write_config(
        tmp_path,
        {"chat": {"model_path": str(tiny_chat), "params": {"n_ctx": 4096}}},
        grpc_port=port,
        system={"llama_server_path": fake_server(tmp_path, "--load-delay", "0.5")},
    )
    with router_process(config, port):
        async with RouterClient(f"127.0.0.1:{port}") as client:
            app = create_app(load_settings(config, env={}), client=client)
            yield await aiohttp_client(app)


async def _post(http: TestClient[Any, Any], path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await asyncio.wait_for(http.post(path, json=body), REQUEST_TIMEOUT)
    return response.status, await response.json()


def _assert_invalid(status: int, payload: Any, field: str) -> None:
    assert status == 400, payload
    error = payload["error"]
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]
    assert "Traceback" not in error["message"] and "/" not in error["message"]


async def test_bad_load_timeouts_are_400_and_the_router_still_loads(
    over_real_router: TestClient[Any, Any],
) -> None:
    http = over_real_router
    for value in BAD_SECONDS:
        status, payload = await _post(
            http, "/v1/models/chat/load", {"wait": True, "timeout_sec": value}
        )
        _assert_invalid(status, payload, "timeout_sec")

    status, payload = await _post(http, "/v1/models/chat/load", {"wait": True, "timeout_sec": 20})
    assert status == 200, payload
    assert payload["model"]["state"] == "MODEL_STATE_READY"


async def test_bad_drain_timeouts_are_400_and_leave_the_model_loaded(
    over_real_router: TestClient[Any, Any],
) -> None:
    http = over_real_router
    status, payload = await _post(http, "/v1/models/chat/load", {"wait": True})
    assert status == 200, payload
    for value in BAD_SECONDS:
        status, payload = await _post(http, "/v1/models/chat/unload", {"drain_timeout_sec": value})
        _assert_invalid(status, payload, "drain_timeout_sec")

    response = await http.get("/v1/models/chat/status")
    assert (await response.json())["model"]["state"] == "MODEL_STATE_READY"
    status, payload = await _post(http, "/v1/models/chat/unload", {"drain_timeout_sec": 5})
    assert status == 200 and payload["was_running"] is True, payload
