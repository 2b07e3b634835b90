"""Unloads that meet a load or another stop halfway (fake llama-server children, real processes).

Each case was found by reading the supervisor, and each failed before its fix:
- a forced unload during a timed-out load's stop left the model STARTING, its room held and
  its child running;
- a stop whose caller was cancelled left the next stop with nothing to do;
- a LoadModel waiting for a load that an unload cancelled waited out its whole timeout;
- a forced unload during a draining unload waited for the drain;
- a request granted a slot just before a graceful unload was told its model had crashed.
- a crash during a draining unload, then a reload: the stop killed the new child and
  released its room;
- a child the kernel never reaps held its failed load's stop, and the device's load turn,
  forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from clients import End, GenerateEvent, RouterClient, UnavailableError
from router.config import Settings
from router.errors import RouterError
from router.pool import process as process_module
from router.pool import supervisor as supervisor_module
from router.pool.process import ChildProcess
from router.pool.state import ModelState
from router.pool.supervisor import Supervisor
from router.scheduler.queue import Priority
from router.v1 import errors_pb2
from tests.helpers import fake_server, pid_alive, running_router, settings_for, wait_until
from tests.integration.test_pool_faults import PROMPT, drain


def model_entry(tmp_path: Path, tiny_chat: Path, name: str) -> dict[str, object]:
    """A model for the fake server; the router reads the real GGUF header for its estimate."""
    path = tmp_path / f"{name}.gguf"
    path.symlink_to(tiny_chat)
    return {"model_path": str(path), "params": {"n_ctx": 131072}}


def one_fake_model(
    tmp_path: Path, tiny_chat: Path, alias: str, knobs: str = "", **system: object
) -> Settings:
    """Settings serving ``alias`` from the fake llama-server started with ``knobs``."""
    return settings_for(
        tmp_path,
        {alias: model_entry(tmp_path, tiny_chat, alias)},
        system={"llama_server_path": fake_server(tmp_path, knobs), **system},
    )


async def draining(
    client: RouterClient, supervisor: Supervisor, tokens: int, unload: Coroutine[Any, Any, Any]
) -> tuple[asyncio.Task[list[GenerateEvent]], asyncio.Task[Any]]:
    """Load "m", start a request for ``tokens`` tokens, then ``unload``; once the model
    drains, return the request's task and the unload's."""
    await client.load("m")
    running = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": tokens}))
    await wait_until(lambda: supervisor.in_flight == 1, 5)
    stopping = asyncio.create_task(unload)
    await wait_until(lambda: supervisor.state is ModelState.DRAINING, 5)
    return running, stopping


async def test_a_forced_unload_during_a_timed_out_loads_stop_finishes_it(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopping = asyncio.Event()
    stop = ChildProcess.stop

    async def stop_and_tell(child: ChildProcess, grace: float) -> int | None:
        stopping.set()
        return await stop(child, grace)

    monkeypatch.setattr(ChildProcess, "stop", stop_and_tell)
    settings = one_fake_model(
        tmp_path,
        tiny_chat,
        "slow",
        "--load-delay 60 --ignore-sigterm",
        wait_ready_sec=0.5,
        stop_grace_sec=4,
        model_load_max_retries=0,
    )
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("slow")
        await client.load("slow", wait=False)
        await wait_until(lambda: supervisor.child is not None, 10)
        pid = supervisor.child.pid  # type: ignore[union-attr]
        # Readiness times out after 0.5 s; the child ignores the SIGTERM that follows, so the
        # load is then in the 4 s grace before SIGKILL. The unload lands in that window.
        await asyncio.wait_for(stopping.wait(), 10)  # the SIGTERM is sent (and ignored)
        assert supervisor.state.value in ("starting", "loading")
        assert pid_alive(pid)
        await client.unload("slow", force=True)
        assert supervisor.state is ModelState.STOPPED
        assert not pid_alive(pid)
        assert router.pool.reservations() == {}
        await client.load("slow", wait=False)  # and it can load again
        await wait_until(lambda: supervisor.child is not None, 10)


async def test_a_stop_whose_caller_was_cancelled_does_not_swallow_the_next(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = one_fake_model(tmp_path, tiny_chat, "m", "--token-delay 0.01")
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("m")
        running, caller = await draining(
            client, supervisor, 30, supervisor.unload(force=False, drain_timeout=10)
        )
        caller.cancel()  # e.g. the admin's call hit its deadline; the stop goes on
        assert isinstance((await running)[-1], End)
        await wait_until(lambda: supervisor.state is ModelState.STOPPED, 5)

        await client.load("m")
        pid = supervisor.child.pid  # type: ignore[union-attr]
        await client.unload("m")
        assert supervisor.state is ModelState.STOPPED
        assert not pid_alive(pid)


async def test_a_waiting_load_fails_at_once_when_an_unload_cancels_it(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = one_fake_model(tmp_path, tiny_chat, "slow", "--load-delay 60", wait_ready_sec=60)
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("slow")
        waiting = asyncio.create_task(client.load("slow", timeout=30))
        await wait_until(lambda: supervisor.child is not None, 10)
        started = time.monotonic()
        await client.unload("slow", force=True)
        with pytest.raises(UnavailableError) as caught:
            await asyncio.wait_for(waiting, 5)
        assert caught.value.reason == "MODEL_UNLOADED"
        assert time.monotonic() - started < 5


async def test_a_forced_unload_cuts_a_running_drain_short(tmp_path: Path, tiny_chat: Path) -> None:
    settings = one_fake_model(tmp_path, tiny_chat, "m", "--token-delay 0.05")
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("m")
        running, unload = await draining(
            client, supervisor, 1000, client.unload("m", drain_timeout=60)
        )
        started = time.monotonic()
        await client.unload("m", force=True)
        assert time.monotonic() - started < 5  # not the 60 s drain (1000 tokens take 50 s)
        assert supervisor.state is ModelState.STOPPED
        await asyncio.wait_for(unload, 5)
        with pytest.raises(UnavailableError) as caught:
            await running
        assert caught.value.reason == "MODEL_UNLOADED"


async def test_a_request_granted_just_before_an_unload_is_told_it_was_unloaded(
    tmp_path: Path, tiny_chat: Path
) -> None:
    settings = one_fake_model(tmp_path, tiny_chat, "m")
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("m")
        await client.load("m")
        ticket = supervisor.enter(Priority.NORMAL)  # a free slot: granted at once
        # The unload leaves READY before the request's task resumes to take its slot.
        unload = asyncio.create_task(supervisor.unload(force=False, drain_timeout=5))
        await asyncio.sleep(0)
        assert supervisor.state is ModelState.DRAINING
        try:
            with pytest.raises(RouterError) as caught:
                async for _ in ticket.progress():
                    pass
        finally:
            ticket.close()
        assert caught.value.reason == errors_pb2.ERROR_REASON_MODEL_UNLOADED
        await unload
        assert supervisor.queue.counters.total_failed == 1


async def test_a_crash_during_a_drain_leaves_the_reload_alone(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child crashes while an unload drains it, and a request that came meanwhile reloads
    the model. The stop used to go on once its drain ended: with the reload READY by then, it
    killed the new child and released the new room (a model counted against no memory)."""
    monkeypatch.setattr(supervisor_module, "restart_delay", lambda failures: 0.0)
    entry = model_entry(tmp_path, tiny_chat, "m")
    settings = settings_for(
        tmp_path,
        {"m": {**entry, "params": {"n_ctx": 131072, "parallel_override": 2}}},
        system={
            "llama_server_path": fake_server(tmp_path, "--crash-after-tokens 5 --token-delay 0.05")
        },
    )
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("m")
        await client.load("m")
        held = supervisor.enter(Priority.NORMAL)  # a granted slot that keeps the drain going
        try:
            crashing = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 100}))
            await wait_until(lambda: supervisor.in_flight == 2, 5)
            stopping = asyncio.create_task(supervisor.unload(force=False, drain_timeout=30))
            await wait_until(lambda: supervisor.state is ModelState.DRAINING, 5)
            arriving = await asyncio.wait_for(
                drain(client, "m", {**PROMPT, "max_tokens": 2}), 20
            )  # waits out the crash, then is served by the reload
            assert isinstance(arriving[-1], End)
            with pytest.raises(UnavailableError):
                await crashing
            reloaded = supervisor.child
            assert supervisor.state is ModelState.READY and reloaded is not None
        finally:
            held.close()  # the drain's last request ends: the old stop ends with it
        await asyncio.wait_for(stopping, 10)
        assert supervisor.state is ModelState.READY
        assert supervisor.child is reloaded and reloaded.running
        assert "m" in router.pool.reservations()  # its room is accounted


async def test_a_child_the_kernel_does_not_reap_does_not_hold_its_load_forever(
    tmp_path: Path, tiny_chat: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process stuck in the kernel (say, in a GPU driver call) is never reaped, SIGKILL or
    # not. Simulated at the process seam: the router's wait for its exit never returns. Before:
    # the failed load's stop waited forever, holding the device's load turn, and every request
    # for a model on that device waited with it.
    spawn = asyncio.create_subprocess_exec

    async def unreapable(*argv: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await spawn(*argv, **kwargs)

        async def never() -> int:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        process.wait = never  # type: ignore[method-assign]
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", unreapable)
    monkeypatch.setattr(process_module, "REAP_TIMEOUT_SEC", 0.5)
    settings = one_fake_model(
        tmp_path,
        tiny_chat,
        "m",
        "--load-delay 1000",  # never ready: the load times out and stops its child
        wait_ready_sec=1,
        model_load_max_retries=0,
        stop_grace_sec=0.5,
    )
    async with running_router(settings) as (router, client):
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(drain(client, "m"), 10)
        assert time.monotonic() - started < 5
        assert router.pool.reservations() == {}
