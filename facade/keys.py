"""Every typed key of the facade's application and request state."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from clients import RouterClient
from facade.metrics import FacadeMetrics
from facade.sse import StreamRegistry
from router.config import Settings

__all__ = ["CLIENT", "METRICS", "REQUEST_ID", "SETTINGS", "STREAMS"]

SETTINGS: Final = web.AppKey("settings", Settings)
# The one RouterClient (one gRPC channel) every handler shares; set by the app's cleanup_ctx.
CLIENT: Final = web.AppKey("client", RouterClient)
STREAMS: Final = web.AppKey("streams", StreamRegistry)
METRICS: Final = web.AppKey("metrics", FacadeMetrics)
# The X-Request-ID a request was accepted or given, once computed.
REQUEST_ID: Final = web.RequestKey("request_id", str)
