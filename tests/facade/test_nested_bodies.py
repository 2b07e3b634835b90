"""Bodies nested deeper than Python's recursion limit: a 400 from the facade, not a 500 with a
traceback in the log. The router is never called."""

from __future__ import annotations

import logging

import pytest

from tests.facade.conftest import Facade

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/v1/chat/completions", DEEP),
        ("/v1/chat/completions", '{"model": "chat", "messages": ' + DEEP + "}"),
        ("/v1/completions", '{"model": "chat", "prompt": ' + DEEP + "}"),
        ("/v1/embeddings", '{"model": "chat", "input": ' + DEEP + "}"),
        ("/v1/models/chat/load", '{"timeout_sec": ' + DEEP + "}"),
    ],
)
async def test_deeply_nested_bodies_are_400_without_a_traceback(
    facade: Facade, caplog: pytest.LogCaptureFixture, path: str, text: str
) -> None:
    caplog.set_level(logging.DEBUG)

    response = await facade.http.post(path, data=text, headers={"Content-Type": "application/json"})

    payload = await response.json()
    assert response.status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    assert facade.fake.calls == []  # refused by the facade itself
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
