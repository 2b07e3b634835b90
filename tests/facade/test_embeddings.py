"""POST /v1/embeddings: input shapes, encodings, validation, one batched call."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from facade.openai.embeddings import encode_base64
from router.v1 import inference_service_pb2
from tests.facade.conftest import Facade


async def embed(facade: Facade, body: dict[str, Any]) -> tuple[int, Any]:
    response = await facade.http.post("/v1/embeddings", json=body)
    return response.status, await response.json()


def sent(facade: Facade) -> inference_service_pb2.EmbedRequest:
    (call,) = facade.fake.calls
    assert isinstance(call.request, inference_service_pb2.EmbedRequest)
    return call.request


async def test_a_string_gets_one_vector_in_openai_shape(facade: Facade) -> None:
    status, body = await embed(facade, {"model": "bge", "input": "hello"})

    assert status == 200
    # The fake embeds input i as [i, len(input)] and counts characters as tokens.
    assert body == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 5.0]}],
        "model": "bge",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    assert list(sent(facade).inputs) == ["hello"]


async def test_a_batch_is_one_call_in_input_order(facade: Facade) -> None:
    status, body = await embed(facade, {"model": "bge", "input": ["a", "bb", "ccc"]})

    assert status == 200
    assert [item["embedding"] for item in body["data"]] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert list(sent(facade).inputs) == ["a", "bb", "ccc"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [([5, 6, 7], [[5, 6, 7]]), ([[1, 2], [3]], [[1, 2], [3]])],
    ids=["token-ids", "token-id-lists"],
)
async def test_token_inputs_are_sent_as_token_ids(
    facade: Facade, given: list[Any], expected: list[list[int]]
) -> None:
    status, body = await embed(facade, {"model": "bge", "input": given})

    assert status == 200
    assert len(body["data"]) == len(expected)
    assert [list(tokens.ids) for tokens in sent(facade).token_inputs] == expected


async def test_base64_is_little_endian_float32(facade: Facade) -> None:
    status, body = await embed(
        facade, {"model": "bge", "input": ["x", "yy"], "encoding_format": "base64"}
    )

    assert status == 200
    vectors = [struct.unpack("<2f", base64.b64decode(item["embedding"])) for item in body["data"]]
    assert vectors == [(0.0, 1.0), (1.0, 2.0)]


def test_base64_encoding_matches_openai() -> None:
    assert encode_base64([1.0, -2.5]) == base64.b64encode(struct.pack("<2f", 1.0, -2.5)).decode()


async def test_the_priority_and_request_id_reach_the_router(facade: Facade) -> None:
    response = await facade.http.post(
        "/v1/embeddings",
        json={"model": "bge", "input": "hi"},
        headers={"X-Request-Priority": "low", "X-Request-ID": "emb-1"},
    )

    assert response.status == 200
    request = sent(facade)
    assert request.priority == inference_service_pb2.PRIORITY_LOW
    assert request.request_id == "emb-1"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": "bge"}, "input"),
        ({"model": "bge", "input": ""}, "input"),
        ({"model": "bge", "input": []}, "input"),
        ({"model": "bge", "input": ["a", ""]}, "input"),
        ({"model": "bge", "input": ["a", 1]}, "input"),
        ({"model": "bge", "input": [True, False]}, "input"),
        ({"model": "bge", "input": [-1]}, "input"),
        ({"model": "bge", "input": [2**31]}, "input"),
        ({"model": "bge", "input": [1.5]}, "input"),
        ({"model": "bge", "input": [[1], []]}, "input"),
        ({"model": "bge", "input": [[1], "a"]}, "input"),
        ({"model": "bge", "input": {"text": "a"}}, "input"),
        ({"model": "bge", "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
async def test_invalid_inputs_are_400_before_any_call(
    facade: Facade, body: dict[str, Any], param: str
) -> None:
    status, answer = await embed(facade, body)

    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert facade.fake.calls == []
