"""GET /openapi.json: a well-formed OpenAPI 3 document covering every route of the app."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from facade.app import create_app
from router.v1 import model_pb2
from tests.facade.conftest import Facade, facade_settings, mounted_routes

METHODS = {"get", "put", "post", "delete", "patch", "options", "head"}


@pytest.fixture
async def document(facade: Facade) -> dict[str, Any]:
    response = await facade.http.get("/openapi.json")
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_it_is_openapi_3_with_info(document: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.0\.\d", document["openapi"])
    assert document["info"]["title"] and document["info"]["version"]


def test_every_route_of_the_app_is_described(document: dict[str, Any], tmp_path: Path) -> None:
    app = create_app(facade_settings(tmp_path))
    routes = {(method.lower(), path) for method, path in mounted_routes(app)}

    described = {(method, path) for path, method, _ in operations(document)}

    assert described == routes


def test_operations_are_complete(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    for path, method, operation in operations(document):
        assert method in METHODS
        assert "200" in operation["responses"], (method, path)
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)
        for response in operation["responses"].values():
            assert response["description"]


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_admin_schemas_follow_the_proto(document: dict[str, Any]) -> None:
    model = document["components"]["schemas"]["router.v1.Model"]

    assert set(model["properties"]) == {f.name for f in model_pb2.Model.DESCRIPTOR.fields}
    assert model["properties"]["state"]["enum"][0] == "MODEL_STATE_UNSPECIFIED"
    assert model["properties"]["state_since"] == {"type": "string", "format": "date-time"}
    assert "alias" in model["required"] and "state_since" not in model["required"]
    load = document["paths"]["/v1/models/{model}/load"]["post"]
    body = load["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"model", "wait", "timeout_sec"}
    logs = document["paths"]["/v1/models/{model}/logs"]["get"]
    assert [(p["name"], p["in"]) for p in logs["parameters"]] == [
        ("model", "path"),
        ("lines", "query"),
    ]
    stream = document["paths"]["/v1/models/status/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert ("Last-Event-ID", "header") in [(p["name"], p["in"]) for p in stream["parameters"]]


def test_openai_operations_accept_json_and_answer_json_or_sse(document: dict[str, Any]) -> None:
    chat = document["paths"]["/v1/chat/completions"]["post"]

    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"400", "404", "413", "429", "503", "504"} <= set(chat["responses"])
