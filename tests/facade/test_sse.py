"""The SSE frame builders."""

from __future__ import annotations

from facade.errors import ApiError
from facade.sse import data_frame, event_frame, openai_error_frame


def test_a_data_frame_per_item() -> None:
    assert data_frame(['{"a":1}', '{"b":2}']) == b'data: {"a":1}\n\ndata: {"b":2}\n\n'


def test_an_event_frame_with_and_without_id() -> None:
    assert event_frame("heartbeat", "{}", "e-1") == b"event: heartbeat\nid: e-1\ndata: {}\n\n"
    assert event_frame("error", "{}") == b"event: error\ndata: {}\n\n"


def test_an_openai_error_frame_ends_with_done() -> None:
    error = ApiError(503, "gone", type="server_error", code="model_crashed")

    assert openai_error_frame(error) == (
        b'data: {"error":{"message":"gone","type":"server_error","param":null,'
        b'"code":"model_crashed"}}\n\ndata: [DONE]\n\n'
    )
