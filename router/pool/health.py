"""Liveness of READY children: periodic /health probes, replacement of hung ones.

A child that stops answering (deadlocked, SIGSTOPped, swapping to death) does
not exit, so the exit watcher never sees it. Each READY child is probed every
``interval``; a request that saw upstream silence marks its child suspect,
which switches it to fast probing. ``failures_to_replace`` failed probes in a
row replace the child. The history feeds GetModelHealth.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from router.pool import process
from router.pool.state import ModelState
from router.pool.supervisor import Supervisor

_LOGGER = logging.getLogger(__name__)


class HealthStatus(enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    NOT_RUNNING = "not_running"


@dataclass(slots=True)
class HealthRecord:
    probes: int = 0
    successes: int = 0
    consecutive_failures: int = 0
    last_check: float = 0.0  # Unix seconds
    total_probe_ms: float = 0.0
    replacements: int = 0
    suspect: bool = False

    @property
    def uptime_percent(self) -> float:
        return 100.0 * self.successes / self.probes if self.probes else 100.0

    @property
    def avg_probe_ms(self) -> float:
        return self.total_probe_ms / self.probes if self.probes else 0.0


def health_status(record: HealthRecord, state: ModelState) -> HealthStatus:
    if state is ModelState.FAILED:
        return HealthStatus.DOWN
    if state is not ModelState.READY:
        return HealthStatus.NOT_RUNNING
    return HealthStatus.DEGRADED if record.consecutive_failures else HealthStatus.HEALTHY


class LivenessMonitor:
    def __init__(
        self,
        supervisors: Callable[[], list[Supervisor]],
        *,
        interval: float,
        timeout: float,
        failures_to_replace: int,
    ) -> None:
        self._supervisors = supervisors
        self._interval = interval
        self._timeout = timeout
        self._failures_to_replace = failures_to_replace
        self.records: dict[str, HealthRecord] = {}
        self._wakeup = asyncio.Event()

    def record(self, alias: str) -> HealthRecord:
        return self.records.setdefault(alias, HealthRecord())

    def suspect(self, supervisor: Supervisor) -> None:
        self.record(supervisor.alias).suspect = True
        self._wakeup.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Probe until cancelled, through ``session`` (an untraced one: see PoolContext)."""
        while True:
            suspects = False
            # One model's error (or a bug here) must not end probing for every model.
            try:
                suspects = await self._probe_all(session)
            except Exception:
                _LOGGER.exception("liveness round failed; probing goes on")
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), self._timeout if suspects else self._interval
                )

    async def _probe_all(self, session: aiohttp.ClientSession) -> bool:
        """Probe every READY child; return whether one is suspect (fast probing)."""
        ready = [s for s in self._supervisors() if s.state is ModelState.READY]
        results = await asyncio.gather(
            *(self._probe(s, session) for s in ready), return_exceptions=True
        )
        for supervisor, result in zip(ready, results, strict=True):
            if isinstance(result, Exception):
                _LOGGER.error("%s: liveness probe failed", supervisor.alias, exc_info=result)
            elif isinstance(result, BaseException):
                raise result  # cancelled: the monitor is stopping
        return any(self.record(s.alias).suspect for s in ready)

    async def _probe(self, supervisor: Supervisor, session: aiohttp.ClientSession) -> None:
        child = supervisor.child
        if child is None or supervisor.state is not ModelState.READY:
            return
        record = self.record(supervisor.alias)
        started = time.monotonic()
        ok = await process.health_status(session, child.health_url, self._timeout) == 200
        if supervisor.child is not child or supervisor.state is not ModelState.READY:
            return  # the child changed while probing; this result is about the old one
        record.probes += 1
        record.total_probe_ms += (time.monotonic() - started) * 1000
        record.last_check = time.time()
        if ok:
            record.successes += 1
            record.consecutive_failures = 0
            record.suspect = False
            return
        record.consecutive_failures += 1
        _LOGGER.warning(
            "%s: liveness probe failed (%d in a row)",
            supervisor.alias,
            record.consecutive_failures,
        )
        if record.consecutive_failures >= self._failures_to_replace:
            record.replacements += 1
            record.consecutive_failures = 0
            record.suspect = False
            await supervisor.replace_hung()
