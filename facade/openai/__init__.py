"""The OpenAI-compatible routes: chat and text completions, embeddings, models."""

from __future__ import annotations

from aiohttp import web

from facade.openai.embeddings import embeddings
from facade.openai.generation import chat_completions, completions
from facade.openai.models import get_model, list_models

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    """Mount the OpenAI routes on `app`."""
    app.router.add_route("POST", "/v1/chat/completions", chat_completions)
    app.router.add_route("POST", "/v1/completions", completions)
    app.router.add_route("POST", "/v1/embeddings", embeddings)
    app.router.add_route("GET", "/v1/models", list_models)
    app.router.add_route("GET", "/v1/models/{model}", get_model)
