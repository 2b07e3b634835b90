"""`GET /health`: the facade answers, and says whether the router does."""

from __future__ import annotations

from aiohttp import web

from clients import RouterError
from facade.keys import CLIENT

__all__ = ["health"]

# How long the router gets to answer before the facade reports itself degraded.
_ROUTER_TIMEOUT_SEC = 1.0


async def health(request: web.Request) -> web.Response:
    """200 `{"status": "ok", ...}` when the router answers within a second, else 503 "degraded"."""
    connected = await _router_answers(request)
    body = {"status": "ok" if connected else "degraded", "router": {"connected": connected}}
    return web.json_response(body, status=200 if connected else 503)


async def _router_answers(request: web.Request) -> bool:
    # ListModels reads snapshots only: it never loads a model.
    try:
        await request.app[CLIENT].list_models(timeout=_ROUTER_TIMEOUT_SEC)
    except RouterError as error:
        # A refusal with a reason (e.g. a key the router rejects) still came from the router;
        # without one, the channel or the deadline failed.
        return bool(error.reason)
    return True
