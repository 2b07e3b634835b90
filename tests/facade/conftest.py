"""The facade app against the in-process fake router, through pytest-aiohttp's test client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from clients import RouterClient
from facade.app import create_app
from router.config import Settings
from tests.clients.fake_router import FakeRouter, serve_fake_router
from tests.helpers import chat_model, settings_for


@dataclass
class Facade:
    """A facade app under test: its HTTP client, and the fake router behind it."""

    http: TestClient[Any, Any]
    fake: FakeRouter


MakeFacade = Callable[..., Awaitable[Facade]]


def facade_settings(directory: Path, **api: Any) -> Settings:
    """Settings with one chat model (never started here) and `api` overrides."""
    return settings_for(directory, {"chat": chat_model(directory / "chat.gguf")}, api=api)


@pytest.fixture
async def make_facade(aiohttp_client: AiohttpClient, tmp_path: Path) -> AsyncIterator[MakeFacade]:
    """Build a facade over a fresh fake router: `await make_facade(fake, api=..., ...)`."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            fake: FakeRouter | None = None,
            *,
            api: Mapping[str, Any] | None = None,
            keepalive_sec: float = 60.0,
        ) -> Facade:
            fake_router, target = await stack.enter_async_context(serve_fake_router(fake))
            client = await stack.enter_async_context(RouterClient(target))
            settings = facade_settings(tmp_path, **(api or {}))
            app = create_app(settings, client=client, keepalive_sec=keepalive_sec)
            return Facade(await aiohttp_client(app), fake_router)

        yield make


@pytest.fixture
async def facade(make_facade: MakeFacade) -> Facade:
    """The default facade: no CORS, a long keep-alive interval, a fresh fake router."""
    return await make_facade()


def mounted_routes(app: web.Application) -> set[tuple[str, str]]:
    """(HTTP method, path template) of every route mounted on `app`."""
    routes = set()
    for route in app.router.routes():
        assert route.resource is not None
        routes.add((route.method, route.resource.canonical))
    return routes
