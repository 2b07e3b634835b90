"""Admission bookkeeping for one model: running requests, waiters, dispatch order.

At most ``capacity`` requests run (the model's slots while it is READY, else 0);
the rest wait. Dispatch picks the best waiter by ``dispatch_key``: priority,
then arrival. A waiter passed over ``aging_dispatches`` times (a later arrival
dispatched first) counts as HIGH from then on, so LOW cannot starve.

``budget`` limits dispatches while another model waits for this one's room
(swap-thrash avoidance, see scheduler.policy); None means unlimited.

No I/O and no awaiting here: the supervisor awaits a waiter's ``granted`` future.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from dataclasses import dataclass, field
from typing import Literal

from router.errors import QueueFull


class Priority(enum.IntEnum):
    LOW = 1
    NORMAL = 2
    HIGH = 3


@dataclass(eq=False, slots=True)
class Waiter:
    priority: Priority
    seq: int
    granted: asyncio.Future[None]
    passes: int = 0


def dispatch_key(waiter: Waiter, aging_dispatches: int) -> tuple[int, int]:
    """Smaller is served first: aged or high priority, then older."""
    effective = Priority.HIGH if waiter.passes >= aging_dispatches else waiter.priority
    return (-effective, waiter.seq)


# How a request that joined the queue ended, for the counters: it ran upstream (successfully
# or not), its caller left before it started, it waited past queue_timeout_sec, or it failed
# before it started (its model's load failed, the model was unloaded or its circuit opened).
Outcome = Literal["processed", "cancelled", "timed_out", "failed"]


@dataclass(slots=True)
class QueueCounters:
    total_requests: int = 0
    total_processed: int = 0
    total_rejected: int = 0
    total_timed_out: int = 0
    total_cancelled: int = 0
    total_failed: int = 0

    def count(self, outcome: Outcome) -> None:
        name = f"total_{outcome}"
        setattr(self, name, getattr(self, name) + 1)


@dataclass(eq=False)
class SlotQueue:
    max_waiting: int
    aging_dispatches: int
    capacity: int = 0
    running: int = 0
    budget: int | None = None
    counters: QueueCounters = field(default_factory=QueueCounters)
    _waiters: list[Waiter] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def join(self, priority: Priority) -> Waiter:
        """Enter the queue; the waiter is granted at once when a slot is free.

        Raises QueueFull when the waiters are at ``max_waiting``.
        """
        loop = asyncio.get_running_loop()
        waiter = Waiter(priority, next(self._seq), loop.create_future())
        self.counters.total_requests += 1
        if not self._waiters and self._can_dispatch():
            self._grant(waiter)
            return waiter
        if len(self._waiters) >= self.max_waiting:
            self.counters.total_rejected += 1
            raise QueueFull(
                f"too many requests waiting for this model ({self.max_waiting})",
                retry_after=1.0,
            )
        self._waiters.append(waiter)
        self.dispatch()
        return waiter

    def leave(self, waiter: Waiter, outcome: Outcome = "cancelled") -> None:
        """A waiter gives up before its grant; a granted one must ``release``."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self.counters.count(outcome)

    def release(self, outcome: Outcome = "processed") -> None:
        """A granted slot is free: its request ended, or never started (``outcome`` says
        why); the next waiter is dispatched."""
        self.running -= 1
        self.counters.count(outcome)
        self.dispatch()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self.dispatch()

    def set_budget(self, budget: int | None) -> None:
        self.budget = budget
        self.dispatch()

    def position(self, waiter: Waiter) -> int:
        """1-based place in dispatch order (0 when not waiting)."""
        if waiter not in self._waiters:
            return 0
        key = dispatch_key(waiter, self.aging_dispatches)
        return 1 + sum(
            1 for other in self._waiters if dispatch_key(other, self.aging_dispatches) < key
        )

    def count_by_priority(self) -> dict[Priority, int]:
        counts = dict.fromkeys(Priority, 0)
        for waiter in self._waiters:
            counts[waiter.priority] += 1
        return counts

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every waiter with ``error`` (forced unload, shutdown)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.granted.done():
                self.counters.count("failed")
                waiter.granted.set_exception(error)
                # Mark retrieved: the waiter may already have gone (its future unawaited).
                waiter.granted.exception()

    def dispatch(self) -> None:
        while self._waiters and self._can_dispatch():
            best = min(self._waiters, key=lambda w: dispatch_key(w, self.aging_dispatches))
            self._waiters.remove(best)
            for other in self._waiters:
                if other.seq < best.seq:
                    other.passes += 1
            self._grant(best)

    def _can_dispatch(self) -> bool:
        return self.running < self.capacity and (self.budget is None or self.budget > 0)

    def _grant(self, waiter: Waiter) -> None:
        self.running += 1
        if self.budget is not None:
            self.budget -= 1
        waiter.granted.set_result(None)
