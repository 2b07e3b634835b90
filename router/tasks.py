"""Background tasks: outside any request's context, referenced until done, errors logged."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


def detached_task(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """A task that belongs to no request: it starts from an empty context.

    ``asyncio.create_task`` copies the caller's context, so a model load started by a
    request would log that request's id, and join its trace, for as long as the child lives.
    """
    return contextvars.Context().run(asyncio.create_task, coro, name=name)


async def finish_before_cancel(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile, then let the
    cancellation through: cleanup that must not stop halfway, and that whoever cancelled the
    caller may then rely on as done (``asyncio.shield`` alone returns at the cancellation and
    leaves the work running unwatched)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError()
        return result


class BackgroundTasks:
    """Fire-and-forget work that is still accounted for: each task stays referenced until it
    ends (an unreferenced task may be collected mid-run, its exception lost) and an error it
    ends with is logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = detached_task(coro, name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
