"""``model_status.json``, the seed's status file, kept current off the event loop.

Every change marks the file dirty; one background task writes the latest
state atomically (temporary file + rename) in a worker thread, so a burst of
changes costs one write and the event loop never blocks on disk (seed defect W18).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from router.pool.snapshot import ModelSnapshot
from router.pool.state import ModelState
from router.status import FullStatus, ServerState

_LOGGER = logging.getLogger(__name__)


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


# The seed's status words (its ModelStatusTracker's), which tools reading the file know; our own
# state name follows as "state". The facade's seed status stream uses the same words.
SEED_MODEL_STATUS = {
    ModelState.STOPPED: "off",
    ModelState.STARTING: "starting",
    ModelState.LOADING: "loading",
    ModelState.READY: "ready",
    ModelState.DRAINING: "stopping",
    ModelState.STOPPING: "stopping",
    ModelState.FAILED: "failed",
}
SEED_SERVER_STATUS = {
    ServerState.STARTING: "starting",
    ServerState.SERVING: "ready",
    ServerState.SHUTTING_DOWN: "shutting_down",
}


def _model(snapshot: ModelSnapshot) -> dict[str, Any]:
    return {
        "alias": snapshot.alias,
        "status": SEED_MODEL_STATUS[snapshot.state],
        "state": snapshot.state.value,
        "port": snapshot.port or None,
        "started_at": _iso(snapshot.state_since) if snapshot.pid else None,
        "last_used_at": _iso(snapshot.last_used_at),
        "load_stage": snapshot.load_stage.value,
        "error_message": snapshot.last_error or None,
        "vram_used_mb": snapshot.memory_measured_mib or snapshot.memory_estimate_mib or None,
        "in_flight": snapshot.in_flight,
        "queued": snapshot.queued,
        "updated_at": _iso(snapshot.state_since),
    }


def render(status: FullStatus) -> dict[str, Any]:
    """The seed's file shape: {server: {...}, models: {alias: {...}}}."""
    server = status.server
    return {
        "server": {
            "status": SEED_SERVER_STATUS[server.state],
            "state": server.state.value,
            "started_at": _iso(server.started_at),
            "updated_at": _iso(server.updated_at),
        },
        "models": {m.alias: _model(m) for m in status.models},
    }


def write_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write to a temporary file of its own, then rename it over ``path``.

    A uniquely named temporary file: the final write at stop may overlap a write
    still running in its worker thread (a thread cannot be cancelled).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(document, indent=2))
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


class StatusFileWriter:
    def __init__(self, path: Path, full_status: Callable[[], FullStatus]) -> None:
        self.path = path
        self._full_status = full_status
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # the last write's thread

    def start(self) -> None:
        self._dirty.set()
        self._task = asyncio.create_task(self._run(), name="status-file")

    def changed(self) -> None:
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self._write():
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Write the final state once more, then stop."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._write()  # a failure is a warning, as while running: the shutdown goes on

    async def _write(self) -> bool:
        """Write the current state; whether it was written (a failure is logged).

        One write at a time, to its end: cancelling the loop's await does not stop its thread,
        and that older write's rename could otherwise land after the final one.
        """
        if self._writing is not None:
            await asyncio.wait({self._writing})
        text = render(self._full_status())
        self._writing = asyncio.ensure_future(asyncio.to_thread(write_atomic, self.path, text))
        try:
            await asyncio.shield(self._writing)
        except OSError as error:
            _LOGGER.warning("cannot write %s: %s", self.path, error)
            return False
        return True
