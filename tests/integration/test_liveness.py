"""Robustness of the background machinery: child replacement, liveness rounds, task errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from clients import End
from router.pool.health import LivenessMonitor
from router.pool.state import ModelState
from router.pool.supervisor import Supervisor
from router.resources.devices import HostMemory
from router.server import Router
from tests.helpers import (
    chat_model,
    fake_server,
    pid_alive,
    running_router,
    settings_for,
    wait_until,
)

PROMPT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}


async def test_a_child_that_sigkill_does_not_reap_is_given_up_on_after_a_bound(
    tmp_path: Path, tiny_chat: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process stuck in the kernel (a GPU driver call) is not reaped after SIGKILL. The
    replacement used to wait for its exit without a bound, leaving the model STOPPING (and
    the liveness monitor, which awaits the replacement, stuck) for as long as that lasted."""
    settings = settings_for(
        tmp_path,
        {"m": chat_model(tiny_chat)},
        system={"llama_server_path": fake_server(tmp_path), "stop_grace_sec": 0.5},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        supervisor = router.pool.get("m")
        child = supervisor.child
        assert child is not None
        pid = child.pid
        record = tmp_path / "state" / "children" / f"{pid}.json"
        # The process outlives its SIGKILLs, as one stuck in the kernel does.
        child.kill = lambda: None  # type: ignore[method-assign]
        try:
            started = time.monotonic()
            await asyncio.wait_for(supervisor.replace_hung(), 10)
            elapsed = time.monotonic() - started
            assert 1.9 < elapsed < 3.5  # two waits of max(1 s, stop_grace_sec)
            assert "not reaped" in caplog.text
            assert supervisor.state is ModelState.STOPPED and supervisor.child is None
            assert pid_alive(pid) and record.exists()  # a restarted router would stop it
            events = [e async for e in client.generate("m", PROMPT)]  # usable again
            assert isinstance(events[-1], End)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        await wait_until(lambda: not record.exists(), 5)  # forgotten once it is gone


class BrokenSupervisor:
    """A peer whose probe raises: it is READY, but reading its child fails."""

    alias = "broken"
    state = ModelState.READY

    @property
    def child(self) -> None:
        raise RuntimeError("broken child")


async def test_an_error_in_a_liveness_round_does_not_stop_probing(
    tmp_path: Path, tiny_chat: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(
        tmp_path, {"m": chat_model(tiny_chat)}, system={"llama_server_path": fake_server(tmp_path)}
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        real = router.pool.get("m")
        calls = 0

        def supervisors() -> list[Supervisor]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("listing failed")  # the whole round fails once
            return [BrokenSupervisor(), real]  # type: ignore[list-item]

        monitor = LivenessMonitor(supervisors, interval=0.05, timeout=1.0, failures_to_replace=2)
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(monitor.run(session))
            try:
                await wait_until(lambda: monitor.record("m").successes >= 3, 5)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert "liveness round failed" in caplog.text and "listing failed" in caplog.text
    assert "broken: liveness probe failed" in caplog.text and "broken child" in caplog.text


class UnmeasurableHost(HostMemory):
    """Host memory whose per-process measurement fails (as a driver error would)."""

    def process_memory_mib(self, pid: int) -> int | None:
        raise OSError("measurement failed")


async def test_background_task_errors_are_logged(
    tmp_path: Path, tiny_chat: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    settings = settings_for(
        tmp_path, {"m": chat_model(tiny_chat)}, system={"llama_server_path": fake_server(tmp_path)}
    )
    router = Router(settings, inventory=UnmeasurableHost())
    await router.start()
    try:
        await router.pool.supervisors()[0].load(wait=True, timeout=10)
        # The supervisor's memory measurement after READY fails in its own task.
        await wait_until(lambda: "measure:m failed" in caplog.text, 5)
        assert "measurement failed" in caplog.text

        async def failing() -> None:
            raise ValueError("background boom")

        router.pool.spawn(failing(), name="doomed")
        await wait_until(lambda: "background task doomed failed" in caplog.text, 5)
        assert "background boom" in caplog.text
    finally:
        await router.stop()
