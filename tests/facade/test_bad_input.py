"""Client input that used to end in a 500: each is the client's to fix, so a 400 says why.

Found by review; every case failed (500) before its fix.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest

from facade import status
from router.v1 import model_pb2
from tests.facade.conftest import Facade

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
HUGE = "9" * 5000  # Python reads at most 4,300 digits of an integer


async def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status == status, await response.text()
    error: dict[str, Any] = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", '{"model": "chat", "messages": [], "seed": ' + HUGE + "}"),
        ("/v1/completions", '{"model": "chat", "prompt": "x", "max_tokens": ' + HUGE + "}"),
        ("/v1/embeddings", '{"model": "chat", "input": [' + HUGE + "]}"),
    ],
    ids=["chat", "completions", "embeddings"],
)
async def test_an_integer_with_too_many_digits(facade: Facade, path: str, body: str) -> None:
    response = await facade.http.post(path, data=body, headers={"Content-Type": "application/json"})

    error = await error_of(response)
    assert "too many digits" in error["message"]
    assert facade.fake.calls == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", r'{"model": "\ud800", "messages": [{"role": "user"}]}', "model"),
        ("/v1/completions", r'{"model": "\ud800", "prompt": "x"}', "model"),
        ("/v1/embeddings", r'{"model": "\ud800", "input": "a"}', "model"),
        ("/v1/embeddings", r'{"model": "chat", "input": ["a", "\udfff"]}', "input"),
    ],
    ids=["chat-model", "completions-model", "embeddings-model", "embeddings-input"],
)
async def test_an_unpaired_surrogate(facade: Facade, path: str, body: str, param: str) -> None:
    response = await facade.http.post(path, data=body, headers={"Content-Type": "application/json"})

    error = await error_of(response)
    assert error["param"] == param
    assert "surrogate" in error["message"]
    assert facade.fake.calls == []


async def test_a_body_that_is_not_the_encoding_it_claims(facade: Facade) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    response = await facade.http.post(
        "/v1/completions", data=b'{"model": "chat"} is not gzip', headers=headers
    )

    error = await error_of(response)
    assert "Content-Encoding" in error["message"]
    assert facade.fake.calls == []


async def test_a_gzip_body_that_is_gzip_is_read(facade: Facade) -> None:
    """The control: aiohttp does decompress a real gzip body (so the 400 above is about the
    bytes, not the header). An invalid request body, to stop before the router."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    response = await facade.http.post(
        "/v1/completions", data=gzip.compress(b'{"model": "chat"}'), headers=headers
    )

    error = await error_of(response)
    assert error["param"] == "prompt"


async def test_a_last_event_id_that_is_not_ascii(facade: Facade) -> None:
    # Raw bytes: aiohttp's client would send the header as valid UTF-8.
    server = facade.http.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"GET /v1/models/status/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Last-Event-ID: \xff\xfe\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"Last-Event-ID" in body
    assert facade.fake.calls == []


def test_a_state_this_facade_does_not_know_is_unknown() -> None:
    """A newer router's enum value: the status stream goes on (as the typed client does)."""
    assert status._word(model_pb2.ModelState, model_pb2.MODEL_STATE_READY) == "ready"
    assert status._word(model_pb2.ModelState, 999) == "unknown"
