"""GET /v1/models and /v1/models/{model}: OpenAI's model objects from the router's snapshots."""

from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf import timestamp_pb2

from router.v1 import model_pb2
from tests.clients.fake_router import make_model
from tests.facade.conftest import Facade

CREATED = datetime(2025, 12, 1, 8, 0, 0, tzinfo=timezone.utc)


def with_models(facade: Facade) -> None:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(CREATED)
    facade.fake.models = {
        "chat": make_model("chat", n_ctx=4096, created_at=created),
        "bge": make_model(
            "bge",
            state=model_pb2.MODEL_STATE_STOPPED,
            kind=model_pb2.MODEL_KIND_EMBEDDING,
            n_ctx=2048,
        ),
    }


async def test_list_has_every_configured_model_in_order(facade: Facade) -> None:
    with_models(facade)

    response = await facade.http.get("/v1/models")

    assert response.status == 200
    assert await response.json() == {
        "object": "list",
        "data": [
            {
                "id": "chat",
                "object": "model",
                "created": int(CREATED.timestamp()),
                "owned_by": "routermodel",
                "n_ctx": 4096,
                "kind": "chat",
                "state": "ready",
                "loaded": True,
            },
            {
                "id": "bge",
                "object": "model",
                "created": 0,
                "owned_by": "routermodel",
                "n_ctx": 2048,
                "kind": "embedding",
                "state": "stopped",
                "loaded": False,
            },
        ],
    }


async def test_one_model_by_id(facade: Facade) -> None:
    with_models(facade)

    response = await facade.http.get("/v1/models/bge")

    assert response.status == 200
    body = await response.json()
    assert (body["id"], body["object"], body["loaded"]) == ("bge", "model", False)


async def test_an_unknown_model_is_404_model_not_found(facade: Facade) -> None:
    with_models(facade)

    response = await facade.http.get("/v1/models/nope")

    assert response.status == 404
    assert await response.json() == {
        "error": {
            "message": "model 'nope' is not configured",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
