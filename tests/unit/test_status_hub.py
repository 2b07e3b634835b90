"""The status hub's revisions (what a subscriber is told it has seen, how streams end), and the
status file's last write."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from router.pool.snapshot import LoadStage, ModelKind, ModelSnapshot
from router.pool.state import ModelState
from router.status import FullStatus, Heartbeat, ServerSnapshot, ServerState, StatusEvent, StatusHub
from router.telemetry import status_file


def model(state: ModelState) -> ModelSnapshot:
    now = time.time()
    return ModelSnapshot(
        alias="chat", state=state, kind=ModelKind.CHAT, port=0, pid=0, slots=1, in_flight=0,
        queued=0, n_ctx=512, pinned=False, last_error="", state_since=now, last_used_at=0.0,
        retry_at=0.0, consecutive_failures=0, restarts=0, device="cpu", memory_estimate_mib=1,
        memory_measured_mib=0, load_seconds=0.0, ttl_sec=0.0, load_stage=LoadStage.NONE,
        created_at=now,
    )  # fmt: skip


class World:
    """A hub over one model; `publish_while_reading` publishes a change from inside the next
    read of the full status, which the hub makes when it builds a heartbeat."""

    def __init__(self) -> None:
        self.hub = StatusHub(self.full_status)
        self.publish_while_reading = False

    def full_status(self) -> FullStatus:
        if self.publish_while_reading:
            self.publish_while_reading = False
            self.hub.publish(model(ModelState.STARTING))
        server = ServerSnapshot(ServerState.SERVING, 0.0, self.hub.epoch, "t", True, 0.0)
        return FullStatus(server, (model(ModelState.STOPPED),))


async def test_a_heartbeat_never_claims_a_change_it_has_not_delivered() -> None:
    # Before: a change published as the heartbeat was built gave the heartbeat its revision,
    # so a client resuming from the heartbeat's id never got that change.
    world = World()
    events = world.hub.subscribe(heartbeat_sec=0.01)
    first = await anext(events)
    world.publish_while_reading = True
    seen: list[StatusEvent] = []
    while not any(isinstance(event.payload, ModelSnapshot) for event in seen):
        seen.append(await asyncio.wait_for(anext(events), 1))
    await events.aclose()

    heartbeat = seen[0]
    assert isinstance(heartbeat.payload, Heartbeat)
    assert heartbeat.revision == first.revision == 0
    assert seen[-1].revision == 1
    # Resuming from the heartbeat replays the change.
    resumed = world.hub.subscribe(heartbeat.event_id, heartbeat_sec=60)
    replayed = await anext(resumed)
    await resumed.aclose()
    assert (replayed.revision, replayed.payload) == (1, seen[-1].payload)


async def test_closing_ends_every_stream_after_what_was_published() -> None:
    world = World()
    events = world.hub.subscribe(heartbeat_sec=60)
    await anext(events)
    reading = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # the subscriber now waits for a change
    world.hub.publish(model(ModelState.STARTING))
    world.hub.close()

    assert (await asyncio.wait_for(reading, 1)).revision == 1
    assert [e async for e in events] == []  # ended, not waiting for the next heartbeat


async def test_the_status_files_final_write_is_the_last_to_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: stopping cancelled the writer's await, not its thread; that older write
    # (here slowed by a slow disk) renamed its file after the final one.
    state = ServerState.SERVING
    slow = threading.Event()

    def full_status() -> FullStatus:
        return FullStatus(ServerSnapshot(state, 0.0, "e", "t", True, 0.0), ())

    write_atomic = status_file.write_atomic

    def write(path: Path, document: dict[str, Any]) -> None:
        if document["server"]["state"] == "serving":
            slow.set()
            time.sleep(0.3)
        write_atomic(path, document)

    monkeypatch.setattr(status_file, "write_atomic", write)
    path = tmp_path / "model_status.json"
    writer = status_file.StatusFileWriter(path, full_status)
    writer.start()
    await asyncio.to_thread(slow.wait, 5)  # the first write is under way
    state = ServerState.SHUTTING_DOWN
    await writer.stop()

    await asyncio.sleep(0.5)  # past the slow write's end, whenever it lands
    assert json.loads(path.read_text())["server"]["state"] == "shutting_down"
