"""`GET /v1/models` and `GET /v1/models/{model}`: the configured models in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from clients import ModelInfo
from facade.context import call_metadata
from facade.keys import CLIENT

__all__ = ["get_model", "list_models", "model_object"]

OWNED_BY = "routermodel"


async def list_models(request: web.Request) -> web.Response:
    """Every configured model, loaded or not, in configuration order."""
    listing = await request.app[CLIENT].list_models(metadata=call_metadata(request))
    return web.json_response(
        {"object": "list", "data": [model_object(model) for model in listing.models]}
    )


async def get_model(request: web.Request) -> web.Response:
    """One model; an unknown alias is 404 `model_not_found`."""
    model = await request.app[CLIENT].get_model(
        request.match_info["model"], metadata=call_metadata(request)
    )
    return web.json_response(model_object(model))


def model_object(model: ModelInfo) -> dict[str, Any]:
    """OpenAI's model object, plus the seed's `n_ctx` and the router's view of the model."""
    return {
        "id": model.alias,
        "object": "model",
        "created": int(model.created_at.timestamp()) if model.created_at else 0,
        "owned_by": OWNED_BY,
        "n_ctx": model.n_ctx,
        "kind": model.kind,
        "state": model.state,
        "loaded": model.state == "ready",
    }
