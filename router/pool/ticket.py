"""A request's place with one model: waiting in its queue, then holding a slot.

``Ticket.progress`` waits for a slot (loading the model on demand through the
supervisor's one shared load task) and reports queue positions and load stages
on the way; the granted slot is a ``Lease`` until ``Ticket.close``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

from router.errors import DeadlineExceeded, RouterError, Unavailable
from router.pool.snapshot import LoadStage
from router.pool.state import ModelState
from router.pool.upstream import Upstream
from router.scheduler.queue import Outcome, Waiter
from router.v1 import errors_pb2

if TYPE_CHECKING:
    from router.pool.supervisor import Supervisor

S = ModelState
# How often a waiting request re-reports its queue position.
POSITION_REPORT_SEC = 1.0


class Lease:
    """A slot on a READY child for one request; ``abort`` ends it from outside."""

    __slots__ = ("_supervisor", "abort_error", "response", "upstream")

    def __init__(self, supervisor: Supervisor, upstream: Upstream) -> None:
        self._supervisor = supervisor
        self.upstream = upstream
        self.response: aiohttp.ClientResponse | None = None
        self.abort_error: RouterError | None = None

    def abort(self, error: RouterError) -> None:
        if self.abort_error is None:  # the first cause is the one the caller sees
            self.abort_error = error
        if self.response is not None:
            self.response.close()


class Ticket:
    """A request's place with one model: waiting, then (once granted) a lease."""

    def __init__(self, supervisor: Supervisor, waiter: Waiter) -> None:
        self._supervisor = supervisor
        self._waiter = waiter
        self._lease: Lease | None = None
        self._closed = False
        self._failure: RouterError | None = None  # what ended it before it could start
        self.load_wait_sec = 0.0
        self.queue_wait_sec = 0.0

    @property
    def lease(self) -> Lease:
        assert self._lease is not None, "progress() has not finished"
        return self._lease

    async def progress(self) -> AsyncIterator[tuple[int, int] | LoadStage]:
        """Wait for a slot; yield (position, length) and load stages on the way.

        Raises the load's error if the load this ticket waits for fails, and
        DeadlineExceeded after queue_timeout_sec spent waiting while the model
        was not loading (a load has its own bound, wait_ready_sec).
        """
        sup = self._supervisor
        waiter = self._waiter
        budget = sup.settings.queue_timeout_sec
        last_position: tuple[int, int] | None = None
        last_stage: LoadStage | None = None
        awaited: asyncio.Task[None] | None = None  # the load this ticket waits for
        checkpoint = time.monotonic()
        while not waiter.granted.done():
            if awaited is not None and awaited.done():
                if not awaited.cancelled() and awaited.exception() is not None:
                    raise self._failed(as_router_error(awaited.exception()))
                awaited = None
            awaited = sup.ensure_loading() or awaited
            if awaited is None and sup.state is S.FAILED:
                raise self._failed(sup.circuit_error())
            position = (sup.queue.position(waiter), sup.queue.waiting)
            if position != last_position and position[0] > 0:
                last_position = position
                yield position
            stage = sup.load_stage
            if stage is not last_stage and stage is not LoadStage.NONE:
                last_stage = stage
                yield stage
            loading = awaited is not None
            waits: set[asyncio.Future[Any]] = {waiter.granted, sup.changed()}
            if awaited is not None:
                waits.add(awaited)
            timeout = POSITION_REPORT_SEC if loading else min(POSITION_REPORT_SEC, budget)
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            now = time.monotonic()
            if loading:
                self.load_wait_sec += now - checkpoint
            else:
                budget -= now - checkpoint
                self.queue_wait_sec += now - checkpoint
                if budget <= 0 and not waiter.granted.done():
                    sup.queue.leave(waiter, "timed_out")
                    self._closed = True
                    sup.on_waiter_left()
                    raise DeadlineExceeded(
                        f"waited more than {sup.settings.queue_timeout_sec:g} s for the model",
                        reason=errors_pb2.ERROR_REASON_QUEUE_TIMEOUT,
                    )
            checkpoint = now
        waiter.granted.result()  # raises what fail_waiting set (forced unload, shutdown)
        try:
            self._lease = sup.open_lease()
        except RouterError as error:
            raise self._failed(error) from None
        if last_stage is not None:
            yield LoadStage.READY

    def close(self) -> None:
        """Leave the queue or give the slot back. Idempotent; safe in ``finally``."""
        if self._closed:
            return
        self._closed = True
        sup = self._supervisor
        if self._lease is not None:
            sup.close_lease(self._lease)
        elif self._waiter.granted.done() and not self._waiter.granted.exception():
            sup.release_slot(self._outcome())  # granted, but it never started
        else:  # (a waiter failed by fail_waiting is already counted and gone from the queue)
            sup.queue.leave(self._waiter, self._outcome())
            sup.on_waiter_left()

    def _failed(self, error: RouterError) -> RouterError:
        self._failure = error
        return error

    def _outcome(self) -> Outcome:
        """How this request ended without running: its caller left, or it failed."""
        if self._failure is None:
            return "cancelled"
        if self._failure.reason == errors_pb2.ERROR_REASON_QUEUE_TIMEOUT:
            return "timed_out"  # the admission's wait for room, bounded by queue_timeout_sec
        return "failed"


def as_router_error(error: BaseException | None) -> RouterError:
    if isinstance(error, RouterError):
        return error
    return Unavailable("the model could not be loaded", retry_after=5.0)
