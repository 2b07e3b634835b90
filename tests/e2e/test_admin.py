"""The admin REST bridge against a real router: every seed path, the status SSE, grpcurl parity."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import descriptor, json_format

from facade.bridge import message_json
from router.v1 import model_control_service_pb2 as mpb
from tests.e2e.stack import Stack, get_json, post_json, running_stack
from tests.helpers import REPO, chat_model, embed_model

GRPCURL = REPO / ".venv" / "bin" / "grpcurl"

# (method, path, body, response message): every seed management path, plus load and logs.
PATHS: list[Any] = [
    ("GET", "/v1/models/status", None, mpb.ListModelsResponse),
    ("GET", "/v1/models/status/chat", None, mpb.GetModelResponse),
    ("GET", "/v1/models/chat/status", None, mpb.GetModelResponse),
    ("GET", "/v1/models/failed", None, mpb.ListFailedModelsResponse),
    ("POST", "/v1/models/chat/load", {"wait": True}, mpb.LoadModelResponse),
    ("POST", "/v1/models/eject", {"model": "chat"}, mpb.UnloadModelResponse),
    ("POST", "/v1/models/chat/unload", {}, mpb.UnloadModelResponse),
    ("POST", "/v1/models/chat/reset", None, mpb.ResetModelResponse),
    ("GET", "/v1/queue/stats", None, mpb.GetQueueStatsResponse),
    ("GET", "/vram", None, mpb.GetResourcesResponse),
    ("GET", "/vram/summary", None, mpb.GetResourcesResponse),
    ("GET", "/vram/models/chat", None, mpb.GetResourcesResponse),
    ("GET", "/v1/health/models", None, mpb.GetModelHealthResponse),
    ("GET", "/v1/models/chat/logs?lines=3", None, mpb.GetModelLogsResponse),
]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("admin")
    models = {"chat": chat_model(tiny_chat), "embed": embed_model(tiny_embed)}
    with running_stack(directory, models) as running:
        yield running


def call(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    url = stack.base_url + path
    return post_json(url, body or {}) if method == "POST" else get_json(url)


def assert_shape(value: dict[str, Any], message: descriptor.Descriptor) -> None:
    """Proto-JSON of `message`: proto field names, every field without presence printed."""
    printed = {field.name for field in message.fields if not field.has_presence}
    assert printed <= set(value) <= set(message.fields_by_name), (message.name, value)
    for field in message.fields:
        if field.name in value and field.message_type is not None and not field.is_repeated:
            if field.message_type.full_name.startswith("router.v1."):
                assert_shape(value[field.name], field.message_type)


@pytest.mark.parametrize(("method", "path", "body", "response_type"), PATHS)
def test_every_admin_path_answers_with_its_documented_shape(
    stack: Stack, method: str, path: str, body: Any, response_type: Any
) -> None:
    status, answer = call(stack, method, path, body)

    assert status == 200, answer
    assert_shape(answer, response_type.DESCRIPTOR)
    json_format.ParseDict(answer, response_type())  # and it reads back as the message


def test_the_resource_path_filters_by_model(stack: Stack) -> None:
    _, everything = get_json(stack.base_url + "/vram")
    _, one = get_json(stack.base_url + "/vram/models/embed")

    assert [m["model"] for m in everything["models"]] == ["chat", "embed"]
    assert [m["model"] for m in one["models"]] == ["embed"]


def test_an_unknown_alias_is_404(stack: Stack) -> None:
    status, answer = get_json(stack.base_url + "/v1/models/nope/status")

    assert status == 404
    assert answer["error"]["code"] == "model_not_found"


def test_grpcurl_and_the_bridge_report_the_same_model(stack: Stack) -> None:
    assert post_json(stack.base_url + "/v1/models/chat/load", {"wait": True})[0] == 200

    printed = subprocess.run(
        [str(GRPCURL), "-plaintext", "-max-time", "10", "-d", '{"model": "chat"}']
        + [stack.grpc_target, "router.v1.ModelControlService/GetModel"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    _, rest = get_json(stack.base_url + "/v1/models/status/chat")

    via_grpcurl = message_json(json_format.Parse(printed, mpb.GetModelResponse()))
    assert via_grpcurl == rest
    assert rest["model"]["state"] == "MODEL_STATE_READY" and rest["model"]["pid"] > 0


# The status stream


class EventReader:
    """Reads one SSE event at a time, skipping keep-alive comments."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def next(self) -> tuple[str, str, dict[str, Any]]:
        while True:
            raw = (await self._response.content.readuntil(b"\n\n")).decode()
            fields = dict(
                line.split(": ", 1) for line in raw.strip("\n").split("\n") if ": " in line
            )
            if "event" in fields:
                return fields["event"], fields.get("id", ""), json.loads(fields["data"])

    async def until_status(self, alias: str, status: str) -> list[str]:
        """The ids of the events read until `alias` reaches the seed's `status` word."""
        ids = []
        while True:
            event, event_id, data = await self.next()
            ids.append(event_id)
            # What the seed README's dashboard reads: data.alias, data.status.
            if event == "model_update" and data["alias"] == alias and data["status"] == status:
                return ids


async def test_the_status_stream_follows_a_load_and_an_unload(stack: Stack) -> None:
    async with aiohttp.ClientSession(stack.base_url) as session:
        await session.post("/v1/models/embed/unload", json={})
        async with session.get("/v1/models/status/stream") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            events = EventReader(response)
            event, first_id, snapshot = await events.next()
            assert event == "full_status"
            # The seed's shape: models keyed by alias, the seed's status words.
            assert set(snapshot["models"]) == {"chat", "embed"}
            assert snapshot["models"]["embed"]["status"] == "off"
            assert snapshot["models"]["embed"]["state"] == "stopped"
            assert snapshot["server"]["status"] == "ready"
            assert snapshot["summary"]["total"] == 2

            await session.post("/v1/models/embed/load", json={"wait": True})
            loaded = await events.until_status("embed", "ready")
            await session.post("/v1/models/eject", json={"model": "embed"})
            unloaded = await events.until_status("embed", "off")

        ids = [first_id, *loaded, *unloaded]
        epoch = first_id.rsplit("-", 1)[0]
        revisions = [int(event_id.rsplit("-", 1)[1]) for event_id in ids]
        assert all(event_id.startswith(epoch + "-") for event_id in ids)
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)

        # Resuming after the first change replays what followed it, with no snapshot.
        async with session.get(
            "/v1/models/status/stream", headers={"Last-Event-ID": loaded[0]}
        ) as response:
            replayed = EventReader(response)
            event, event_id, _ = await replayed.next()
        assert (event, event_id) == ("model_update", ids[2])

        # An id from another router run gets a fresh snapshot.
        async with session.get("/v1/models/status/stream?last_event_id=other-3") as response:
            event, _, _ = await EventReader(response).next()
        assert event == "full_status"


async def test_a_resume_with_nothing_to_replay_answers_at_once(stack: Stack) -> None:
    # Before: its headers waited for the first event, the router's heartbeat 15 s later (or
    # the facade's second keep-alive comment), and clients saw a stalled reconnect.
    async with aiohttp.ClientSession(stack.base_url) as session:
        async with session.get("/v1/models/status/stream") as response:
            _, latest, _ = await EventReader(response).next()
        resumed = session.get("/v1/models/status/stream", headers={"Last-Event-ID": latest})
        async with await asyncio.wait_for(resumed, 5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"


# The status file belongs to the monitor scope


INFERENCE_KEY = "admin-test-inference-key-0123"  # "chat" only
MONITOR_KEY = "admin-test-monitor-key-0123"


@pytest.fixture(scope="module")
def keyed_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat: Path, tiny_embed: Path
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("admin-keys")
    models = {"chat": chat_model(tiny_chat), "embed": embed_model(tiny_embed)}
    keys = [
        {"key": INFERENCE_KEY, "scopes": ["inference"], "models": ["chat"]},
        {"key": MONITOR_KEY, "scopes": ["monitor"]},
    ]
    telemetry = {"model_status_path": str(directory / "model_status.json")}
    with running_stack(directory, models, auth={"api_keys": keys}, telemetry=telemetry) as running:
        yield running


async def test_the_status_file_needs_the_monitor_scope(keyed_stack: Stack) -> None:
    """The file lists every alias and child port: an inference key limited to "chat" must not
    read it (it would see "embed"), a monitor key may."""
    url = keyed_stack.base_url + "/v1/models/status/file"

    async def get(key: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            return r.status, await r.json()

    restricted = await get(INFERENCE_KEY)
    monitor = await get(MONITOR_KEY)
    nobody = await get(None)

    assert restricted[0] == 403, restricted
    assert restricted[1]["error"]["type"] == "permission_error"
    assert "embed" not in json.dumps(restricted[1])
    assert monitor[0] == 200, monitor
    assert set(monitor[1]["models"]) == {"chat", "embed"}
    assert nobody[0] == 401
