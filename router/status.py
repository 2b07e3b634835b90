"""Revisioned status events for WatchModels: a snapshot first, then one event per change.

Every change gets the next revision of this router run's epoch. A subscriber
that resumes with ``<epoch>-<revision>`` gets the events it missed from a
bounded history; one from another epoch, or too far behind, gets a fresh full
snapshot. A subscriber that stops reading is resynchronised the same way
instead of growing an unbounded buffer (seed defect: unbounded SSE queues).
A heartbeat carries the revision its subscriber last received, so resuming
from it never skips an event still queued. ``close()`` (the router is
stopping) ends every subscription once it has delivered what was published.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from router.pool.snapshot import ModelSnapshot


class ServerState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    state: ServerState
    started_at: float
    epoch: str
    version: str
    cpu_mode: bool
    updated_at: float


@dataclass(frozen=True, slots=True)
class FullStatus:
    server: ServerSnapshot
    models: tuple[ModelSnapshot, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    timestamp: float
    server_state: ServerState


@dataclass(frozen=True, slots=True)
class StatusEvent:
    revision: int
    epoch: str
    payload: FullStatus | ModelSnapshot | ServerSnapshot | Heartbeat

    @property
    def event_id(self) -> str:
        return f"{self.epoch}-{self.revision}"


class _Subscriber:
    __slots__ = ("events", "lagged", "wakeup")

    def __init__(self) -> None:
        self.events: deque[StatusEvent] = deque()
        self.lagged = False
        self.wakeup = asyncio.Event()


class StatusHub:
    def __init__(
        self,
        full_status: Callable[[], FullStatus],
        *,
        history: int = 1024,
        subscriber_buffer: int = 1024,
    ) -> None:
        self._full_status = full_status
        self.epoch = secrets.token_hex(6)
        self.revision = 0
        self.updated_at = time.time()
        self._history: deque[StatusEvent] = deque(maxlen=history)
        self._buffer = subscriber_buffer
        self._subscribers: set[_Subscriber] = set()
        self._closed = False

    def close(self) -> None:
        """End every subscription after the events already published (the router stops)."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.wakeup.set()

    def publish(self, payload: ModelSnapshot | ServerSnapshot) -> None:
        self.revision += 1
        self.updated_at = time.time()
        event = StatusEvent(self.revision, self.epoch, payload)
        self._history.append(event)
        for subscriber in self._subscribers:
            if len(subscriber.events) >= self._buffer:
                subscriber.lagged = True
                subscriber.events.clear()
            else:
                subscriber.events.append(event)
            subscriber.wakeup.set()

    def _replay_after(self, last_event_id: str) -> list[StatusEvent] | None:
        """The events after ``last_event_id``, or None when they cannot be replayed."""
        epoch, _, revision_text = last_event_id.rpartition("-")
        if epoch != self.epoch or not revision_text.isdigit():
            return None
        revision = int(revision_text)
        if revision > self.revision:
            return None
        if revision == self.revision:
            return []
        if not self._history or self._history[0].revision > revision + 1:
            return None  # the history no longer reaches back that far
        return [event for event in self._history if event.revision > revision]

    async def subscribe(
        self, last_event_id: str = "", heartbeat_sec: float = 15.0
    ) -> AsyncGenerator[StatusEvent, None]:
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        try:
            replay = self._replay_after(last_event_id) if last_event_id else None
            if replay is None:
                delivered = self.revision
                yield StatusEvent(delivered, self.epoch, self._full_status())
            else:
                delivered = int(last_event_id.rpartition("-")[2])
                for event in replay:
                    delivered = event.revision
                    yield event
                subscriber.events = deque(e for e in subscriber.events if e.revision > delivered)
            while True:
                if subscriber.lagged:
                    subscriber.lagged = False
                    subscriber.events.clear()
                    delivered = self.revision
                    yield StatusEvent(delivered, self.epoch, self._full_status())
                    continue
                if subscriber.events:
                    event = subscriber.events.popleft()
                    delivered = event.revision
                    yield event
                    continue
                if self._closed:
                    return
                subscriber.wakeup.clear()
                try:
                    await asyncio.wait_for(subscriber.wakeup.wait(), heartbeat_sec)
                except asyncio.TimeoutError:
                    if subscriber.events or subscriber.lagged:
                        continue  # a change came as the timer fired: it goes first
                    state = self._full_status().server.state
                    yield StatusEvent(delivered, self.epoch, Heartbeat(time.time(), state))
        finally:
            self._subscribers.discard(subscriber)
