"""Dispatch order of one model's queue: priority, FIFO, aging, bounds, budget."""

from __future__ import annotations

import pytest

from router.errors import QueueFull
from router.scheduler.queue import Priority, SlotQueue, Waiter

P = Priority


def granted(waiters: list[Waiter]) -> list[int]:
    return [i for i, w in enumerate(waiters) if w.granted.done()]


async def test_free_slot_grants_at_once() -> None:
    queue = SlotQueue(max_waiting=10, aging_dispatches=8, capacity=2)
    first, second = queue.join(P.NORMAL), queue.join(P.NORMAL)
    assert first.granted.done() and second.granted.done()
    assert queue.running == 2 and queue.waiting == 0


async def test_priority_then_fifo() -> None:
    order = [P.LOW, P.NORMAL, P.HIGH, P.NORMAL, P.HIGH, P.LOW]
    queue = SlotQueue(max_waiting=10, aging_dispatches=100, capacity=0)
    waiters = [queue.join(p) for p in order]
    queue.set_capacity(1)
    served: list[int] = []
    for _ in order:
        now = [i for i in granted(waiters) if i not in served]
        assert len(now) == 1
        served += now
        queue.release()
    assert served == [2, 4, 1, 3, 0, 5]


async def test_low_is_dispatched_after_at_most_k_later_arrivals() -> None:
    k = 3
    queue = SlotQueue(max_waiting=100, aging_dispatches=k, capacity=1)
    queue.join(P.HIGH)  # occupies the slot
    low = queue.join(P.LOW)
    dispatched_before_low = 0
    for _ in range(20):  # a steady stream of HIGH arrivals
        queue.join(P.HIGH)
        queue.release()
        if low.granted.done():
            break
        dispatched_before_low += 1
    assert low.granted.done()
    assert dispatched_before_low <= k


async def test_full_queue_rejects_with_a_retry_hint() -> None:
    queue = SlotQueue(max_waiting=2, aging_dispatches=8, capacity=0)
    queue.join(P.NORMAL)
    queue.join(P.NORMAL)
    with pytest.raises(QueueFull) as caught:
        queue.join(P.HIGH)
    assert caught.value.retry_after is not None
    assert queue.counters.total_rejected == 1


async def test_leaving_removes_the_waiter_and_keeps_order() -> None:
    queue = SlotQueue(max_waiting=10, aging_dispatches=8, capacity=0)
    a, b, c = queue.join(P.NORMAL), queue.join(P.NORMAL), queue.join(P.NORMAL)
    queue.leave(b)
    assert queue.position(a) == 1 and queue.position(c) == 2 and queue.position(b) == 0
    queue.set_capacity(1)
    assert a.granted.done() and not c.granted.done()
    assert queue.counters.total_cancelled == 1


async def test_budget_bounds_dispatches_then_resumes() -> None:
    queue = SlotQueue(max_waiting=10, aging_dispatches=8, capacity=1)
    queue.set_budget(2)
    waiters = [queue.join(P.NORMAL) for _ in range(4)]
    queue.release()
    queue.release()
    assert granted(waiters) == [0, 1]
    assert queue.waiting == 2
    queue.set_budget(None)
    assert granted(waiters) == [0, 1, 2]


async def test_fail_waiting_fails_every_waiter() -> None:
    queue = SlotQueue(max_waiting=10, aging_dispatches=8, capacity=0)
    waiters = [queue.join(P.NORMAL) for _ in range(3)]
    queue.fail_waiting(RuntimeError("gone"))
    assert all(isinstance(w.granted.exception(), RuntimeError) for w in waiters)
    assert queue.waiting == 0


async def test_every_request_ends_in_exactly_one_counter() -> None:
    queue = SlotQueue(max_waiting=3, aging_dispatches=8, capacity=2)
    ran, never_started = queue.join(P.NORMAL), queue.join(P.NORMAL)  # both granted
    cancelled, timed_out, failed = queue.join(P.LOW), queue.join(P.LOW), queue.join(P.LOW)
    with pytest.raises(QueueFull):
        queue.join(P.LOW)
    queue.leave(cancelled)
    queue.leave(timed_out, "timed_out")
    queue.fail_waiting(RuntimeError("unloaded"))
    queue.leave(failed, "failed")  # gone already: not counted twice
    queue.release()  # `ran` ran
    queue.release("cancelled")  # `never_started`'s caller left before it started
    assert ran.granted.done() and never_started.granted.done()
    assert failed.granted.exception() is not None

    c = queue.counters
    assert (c.total_processed, c.total_cancelled, c.total_timed_out, c.total_failed) == (1, 2, 1, 1)
    assert c.total_rejected == 1
    outcomes = c.total_processed + c.total_cancelled + c.total_timed_out + c.total_failed
    assert c.total_requests == outcomes + c.total_rejected + queue.waiting + queue.running == 6
