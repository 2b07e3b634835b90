"""Pool lifecycle under faults, with the fake llama-server as a real child process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients import (
    Chunk,
    DeadlineExceededError,
    End,
    GenerateEvent,
    RouterClient,
    UnavailableError,
)
from clients.errors import RouterError
from router.config import Settings
from router.v1 import model_control_service_pb2 as mpb
from tests.disclosure import assert_error_discloses_nothing
from tests.helpers import fake_server, pid_alive, running_router, settings_for, wait_until

PROMPT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def fake_model(tiny_chat: Path):
    """A model entry for the fake server; the router reads the (real) GGUF header for estimates."""

    def entry(tmp_path: Path, name: str) -> dict[str, object]:
        path = tmp_path / f"{name}.gguf"
        path.symlink_to(tiny_chat)
        return {"model_path": str(path), "params": {"n_ctx": 131072}}  # the fake ignores it

    return entry


@pytest.fixture
def fake(tmp_path: Path):
    return lambda *knobs: fake_server(tmp_path, *knobs)


async def drain(
    client: RouterClient, model: str, body: dict[str, Any] | None = None
) -> list[GenerateEvent]:
    return [event async for event in client.generate(model, body or {**PROMPT, "max_tokens": 3})]


async def test_load_timeout_holds_no_lock(tmp_path: Path, fake, fake_model) -> None:
    """Seed defect W1: a timed-out load must leave every model and status call usable."""
    settings = settings_for(
        tmp_path,
        {"stuck": fake_model(tmp_path, "stuck")},
        system={
            "llama_server_path": fake("--load-delay 60"),
            "wait_ready_sec": 1.5,
            "model_load_max_retries": 0,
        },
    )
    async with running_router(settings) as (router, client):
        stuck = asyncio.create_task(drain(client, "stuck"))
        await wait_until(lambda: router.pool.get("stuck").child is not None, 5)
        stuck_pid = router.pool.get("stuck").child.pid  # type: ignore[union-attr]
        started = time.monotonic()
        status = await client.list_models()
        assert time.monotonic() - started < 1.0  # held up, it would wait out the 1.5 s timeout
        assert {m.alias: m.state for m in status.models}["stuck"] in ("starting", "loading")
        with pytest.raises(UnavailableError) as caught:
            await stuck
        assert caught.value.reason == "LOAD_FAILED"
        assert "ready in time" in caught.value.message
        assert not pid_alive(stuck_pid)
        assert router.pool.reservations() == {}
        model = await client.get_model("stuck")
        assert model.state == "stopped" and model.pid == 0


async def test_load_cancelled_by_unload_releases_everything(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"slow": fake_model(tmp_path, "slow"), "other": fake_model(tmp_path, "other")},
        system={"llama_server_path": fake("--load-delay 60"), "wait_ready_sec": 60},
    )
    async with running_router(settings) as (router, client):
        await client.load("slow", wait=False)
        supervisor = router.pool.get("slow")
        await wait_until(lambda: supervisor.child is not None, 10)
        with pytest.raises(DeadlineExceededError):
            await client.load("slow", timeout=0.3)  # a waiter gives up; the load goes on
        assert supervisor.state.value in ("starting", "loading")
        pid = supervisor.child.pid  # type: ignore[union-attr]
        started = time.monotonic()
        await client.unload("slow", force=True)  # cancels the load
        assert time.monotonic() - started < 3
        assert not pid_alive(pid)
        assert router.pool.reservations() == {}
        assert (await client.get_model("slow")).state == "stopped"
        # Nothing is left locked: another load starts at once.
        load = asyncio.create_task(client.load("other", wait=False))
        await load
        await wait_until(lambda: router.pool.get("other").child is not None, 5)


async def test_crash_loop_opens_the_circuit_and_reset_closes_it(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"crashy": fake_model(tmp_path, "crashy")},
        system={
            "llama_server_path": fake("--exit-at-start 3 --exit-message 'segmentation fault'"),
            "failure_threshold": 3,
            "model_load_max_retries": 2,
            "failure_cooldown_sec": 1.0,
        },
    )
    async with running_router(settings) as (router, client):
        with pytest.raises(UnavailableError):
            await drain(client, "crashy")
        model = await client.get_model("crashy")
        assert model.state == "failed"
        assert model.consecutive_failures == 3
        assert "segmentation" not in model.last_error  # a summary, never the child's log
        spawned = router.pool.get("crashy").log.tail(100).count("segmentation fault")
        assert spawned == 3
        with pytest.raises(UnavailableError) as caught:
            await drain(client, "crashy")
        assert caught.value.reason == "CIRCUIT_OPEN"
        assert caught.value.retry_after is not None and caught.value.retry_after >= 1
        assert router.pool.get("crashy").log.tail(100).count("segmentation fault") == spawned
        # After the cool-down one half-open attempt is made, and it fails alone.
        await asyncio.sleep(1.1)
        with pytest.raises(UnavailableError):
            await drain(client, "crashy")
        assert router.pool.get("crashy").log.tail(100).count("segmentation fault") == spawned + 1
        reset = await client.control.ResetModel(mpb.ResetModelRequest(model="crashy"))
        assert reset.was_failed and reset.previous_error
        assert (await client.get_model("crashy")).state == "stopped"


async def watch_states(
    client: RouterClient, alias: str, into: list[tuple[float, str]], subscribed: asyncio.Event
) -> None:
    """(monotonic time, state) of each change of ``alias`` on the status stream."""
    async for event in client.watch():
        subscribed.set()  # the first event is the full status
        model = event.model
        if event.kind == "model_update" and model is not None and model.alias == alias:
            if not into or into[-1][1] != model.state:
                into.append((time.monotonic(), model.state))


async def test_a_child_crashing_soon_after_ready_backs_off_and_opens_the_circuit(
    tmp_path: Path, fake, fake_model
) -> None:
    """Each start succeeds, then the child dies on its first request. The successful load
    used to reset the failure count, so the circuit never opened and the backoff stayed at
    its first step (0.25 s) however long the loop went on."""
    settings = settings_for(
        tmp_path,
        {"m": {**fake_model(tmp_path, "m"), "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={
            "llama_server_path": fake("--crash-after-tokens 1"),
            "failure_threshold": 3,
            "failure_cooldown_sec": 5.0,
        },
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        states: list[tuple[float, str]] = []
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(watch_states(client, "m", states, subscribed))
        await asyncio.wait_for(subscribed.wait(), 5)

        async def request() -> RouterError:
            with pytest.raises(RouterError) as caught:
                await drain(client, "m")
            return caught.value

        errors = await asyncio.gather(*(request() for _ in range(6)))
        watcher.cancel()
        reasons = sorted(e.reason for e in errors)
        assert reasons == ["CIRCUIT_OPEN"] * 3 + ["MODEL_CRASHED"] * 3, reasons
        for error in errors:
            if error.reason == "CIRCUIT_OPEN":
                assert error.retry_after is not None and 4 <= error.retry_after <= 5
        supervisor = router.pool.get("m")
        assert supervisor.state.value == "failed" and supervisor.consecutive_failures == 3
        assert supervisor.restarts == 2
        # The backoff before each restart grows: restart_delay(1) = 0.25 s, then 0.5 s.
        backoffs = [
            later[0] - earlier[0]
            for earlier, later in zip(states, states[1:], strict=False)
            if earlier[1] == "stopped" and later[1] == "starting"
        ]
        assert len(backoffs) == 2, states
        assert backoffs[0] >= 0.24 and backoffs[1] >= 0.49, backoffs
        # Open: answered at once, without a spawn.
        with pytest.raises(UnavailableError) as caught:
            await drain(client, "m")
        assert caught.value.reason == "CIRCUIT_OPEN"
        assert supervisor.restarts == 2 and supervisor.child is None


async def test_a_child_that_stayed_up_starts_the_failure_count_over(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"m": {**fake_model(tmp_path, "m"), "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={"llama_server_path": fake("--crash-after-tokens 1"), "failure_threshold": 2},
    )
    async with running_router(settings) as (router, client):
        supervisor = router.pool.get("m")
        supervisor.settings = dataclasses.replace(supervisor.settings, stable_after_sec=0.5)
        await client.load("m")
        with pytest.raises(UnavailableError):
            await drain(client, "m")
        assert supervisor.consecutive_failures == 1 and supervisor.state.value == "stopped"
        await client.load("m")
        assert supervisor.consecutive_failures == 1  # not yet: it has not stayed up
        await wait_until(lambda: supervisor.consecutive_failures == 0, 2)
        assert (await client.get_model("m")).consecutive_failures == 0
        with pytest.raises(UnavailableError):
            await drain(client, "m")
        # One crash after a stable run: counted alone, the circuit stays closed.
        assert supervisor.consecutive_failures == 1 and supervisor.state.value == "stopped"


async def test_permanent_failure_opens_the_circuit_at_once(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"bad": fake_model(tmp_path, "bad")},
        system={
            "llama_server_path": fake(
                "--exit-at-start 1 --exit-message 'error: failed to load model'"
            ),
            "model_load_max_retries": 2,
        },
    )
    async with running_router(settings) as (router, client):
        with pytest.raises(UnavailableError) as caught:
            await drain(client, "bad")
        assert "could not be loaded" in caught.value.message
        assert "/" not in caught.value.message  # no paths reach clients
        model = await client.get_model("bad")
        assert model.state == "failed" and model.consecutive_failures == 1


async def test_missing_model_file_fails_that_model_only(tmp_path: Path, fake, fake_model) -> None:
    models = {
        "gone": {"model_path": str(tmp_path / "missing.gguf")},
        "ok": fake_model(tmp_path, "ok"),
    }
    settings = settings_for(tmp_path, models, system={"llama_server_path": fake()})
    async with running_router(settings) as (_, client):
        with pytest.raises(UnavailableError) as caught:
            await drain(client, "gone")
        assert "does not exist" in caught.value.message
        assert str(tmp_path) not in caught.value.message
        events = await drain(client, "ok")
        assert isinstance(events[-1], End)


async def test_a_half_open_retry_of_a_missing_model_file_keeps_the_circuit_open(
    tmp_path: Path, fake, fake_model
) -> None:
    """The half-open attempt fails before it leaves FAILED; it used to raise an internal
    failed -> failed transition error, and clients got a vague error with a 5 s hint."""
    cooldown = 2.0
    entry = fake_model(tmp_path, "m")
    settings = settings_for(
        tmp_path,
        {"m": entry},
        system={"llama_server_path": fake(), "failure_cooldown_sec": cooldown},
    )
    async with running_router(settings) as (router, client):
        assert isinstance((await drain(client, "m"))[-1], End)
        await client.unload("m")
        await asyncio.to_thread(os.unlink, str(entry["model_path"]))
        supervisor = router.pool.get("m")
        with pytest.raises(UnavailableError) as first:
            await drain(client, "m")
        assert first.value.reason == "LOAD_FAILED"
        assert supervisor.state.value == "failed"
        with pytest.raises(UnavailableError) as cooling:
            await drain(client, "m")
        assert cooling.value.reason == "CIRCUIT_OPEN"
        await wait_until(lambda: time.time() >= supervisor.retry_at, cooldown + 1)
        with pytest.raises(UnavailableError) as half_open:
            await drain(client, "m")
        assert half_open.value.reason == "LOAD_FAILED"
        assert "does not exist" in half_open.value.message
        assert half_open.value.retry_after is not None
        assert 1 <= half_open.value.retry_after <= cooldown
        assert supervisor.state.value == "failed" and supervisor.consecutive_failures == 2
        assert supervisor.retry_at - time.time() > cooldown - 0.5  # a new cool-down
        model = await client.get_model("m")
        assert model.state == "failed" and model.retry_at is not None
        assert model.retry_at.timestamp() > time.time()


async def test_child_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"stubborn": fake_model(tmp_path, "stubborn")},
        system={"llama_server_path": fake("--ignore-sigterm"), "stop_grace_sec": 0.5},
    )
    async with running_router(settings) as (router, client):
        await client.load("stubborn")
        pid = router.pool.get("stubborn").child.pid  # type: ignore[union-attr]
        started = time.monotonic()
        await client.unload("stubborn")
        elapsed = time.monotonic() - started
        assert not pid_alive(pid)
        assert 0.4 < elapsed < 3


async def test_drain_lets_in_flight_requests_finish(tmp_path: Path, fake, fake_model) -> None:
    settings = settings_for(
        tmp_path,
        {"m": fake_model(tmp_path, "m")},
        system={"llama_server_path": fake("--token-delay 0.01")},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        running = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 50}))
        await wait_until(lambda: router.pool.get("m").in_flight == 1, 5)
        await client.unload("m", drain_timeout=10)
        events = await running
        assert isinstance(events[-1], End) and events[-1].usage.completion_tokens == 50
        assert (await client.get_model("m")).state == "stopped"


async def test_force_unload_fails_in_flight_requests(tmp_path: Path, fake, fake_model) -> None:
    settings = settings_for(
        tmp_path,
        {"m": fake_model(tmp_path, "m")},
        system={"llama_server_path": fake("--token-delay 0.01")},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        running = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 1000}))
        await wait_until(lambda: router.pool.get("m").in_flight == 1, 5)
        await client.unload("m", force=True)
        with pytest.raises(UnavailableError) as caught:
            await running
        assert caught.value.reason == "MODEL_UNLOADED"


def hung_settings(
    tmp_path: Path,
    fake: Callable[..., str],
    fake_model: Callable[[Path, str], dict[str, object]],
    **system: Any,
) -> Settings:
    return settings_for(
        tmp_path,
        {"m": fake_model(tmp_path, "m"), "bystander": fake_model(tmp_path, "bystander")},
        system={
            "llama_server_path": fake("--token-delay 0.01"),
            "probe_timeout_sec": 0.3,
            "probe_failures_to_replace": 2,
            **system,
        },
    )


async def stream_then_hang(client: RouterClient, pid: int) -> None:
    """Stream from "m" and SIGSTOP its child at the first chunk, checking that "bystander"
    still serves meanwhile; the stream's error propagates."""
    hung = False
    async for event in client.generate("m", {**PROMPT, "max_tokens": 10000}):
        if isinstance(event, Chunk) and not hung:
            os.kill(pid, signal.SIGSTOP)
            hung = True
            assert isinstance((await drain(client, "bystander"))[-1], End)
    raise AssertionError("the stream ended normally")


async def test_a_request_to_a_hung_child_ends_after_the_request_timeout(
    tmp_path: Path, fake, fake_model
) -> None:
    """Probes are far apart: the request's own silence bound ends it, with a clean
    DEADLINE_EXCEEDED; then the child, marked suspect, is probed at once and replaced."""
    settings = hung_settings(
        tmp_path, fake, fake_model, request_timeout_sec=1.0, probe_interval_sec=3600
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        await client.load("bystander")
        pid = router.pool.get("m").child.pid  # type: ignore[union-attr]
        bystander_pid = router.pool.get("bystander").child.pid  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            await stream_then_hang(client, pid)
        elapsed = time.monotonic() - started
        assert caught.value.reason == "UPSTREAM_TIMEOUT"
        assert_error_discloses_nothing(caught.value, secrets=[str(tmp_path)])
        assert 0.9 < elapsed < 2.5, elapsed  # request_timeout_sec after the last byte
        await wait_until(lambda: not pid_alive(pid), 5)
        assert router.pool.liveness.record("m").replacements == 1
        assert isinstance((await drain(client, "m"))[-1], End)
        assert router.pool.get("bystander").child.pid == bystander_pid  # type: ignore[union-attr]


async def test_the_liveness_probe_replaces_a_hung_child(tmp_path: Path, fake, fake_model) -> None:
    """The request would wait 30 s for a byte; the probe (every 0.3 s, two misses) finds the
    child hung first, replaces it, and the request ends with UNAVAILABLE."""
    settings = hung_settings(
        tmp_path, fake, fake_model, request_timeout_sec=30, probe_interval_sec=0.3
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        await client.load("bystander")
        pid = router.pool.get("m").child.pid  # type: ignore[union-attr]
        bystander_pid = router.pool.get("bystander").child.pid  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await stream_then_hang(client, pid)
        assert time.monotonic() - started < 3
        assert caught.value.reason == "MODEL_CRASHED"
        assert "stopped responding" in caught.value.message
        assert_error_discloses_nothing(caught.value, secrets=[str(tmp_path)])
        await wait_until(lambda: not pid_alive(pid), 5)
        health = router.pool.liveness.record("m")
        assert health.replacements == 1
        assert isinstance((await drain(client, "m"))[-1], End)
        assert router.pool.get("m").child.pid != pid  # type: ignore[union-attr]
        assert router.pool.get("bystander").child.pid == bystander_pid  # type: ignore[union-attr]


async def test_queue_full_is_rejected_with_retry_hint(tmp_path: Path, fake, fake_model) -> None:
    settings = settings_for(
        tmp_path,
        {"m": {**fake_model(tmp_path, "m"), "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={"llama_server_path": fake("--token-delay 0.02"), "max_queue_size_per_model": 2},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        body = {**PROMPT, "max_tokens": 100}
        running = [asyncio.create_task(drain(client, "m", body)) for _ in range(3)]
        await wait_until(lambda: router.pool.get("m").queue.waiting == 2, 5)
        from clients import RateLimitError

        with pytest.raises(RateLimitError) as caught:
            await drain(client, "m", body)
        assert caught.value.reason == "QUEUE_FULL" and caught.value.retry_after
        results = await asyncio.gather(*running)
        assert all(isinstance(r[-1], End) for r in results)


async def test_queue_timeout_is_deadline_exceeded(tmp_path: Path, fake, fake_model) -> None:
    settings = settings_for(
        tmp_path,
        {"m": {**fake_model(tmp_path, "m"), "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={"llama_server_path": fake("--token-delay 0.01"), "queue_timeout_sec": 0.5},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        long = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 300}))
        await wait_until(lambda: router.pool.get("m").in_flight == 1, 5)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            await drain(client, "m")
        assert caught.value.reason == "QUEUE_TIMEOUT"
        assert 0.4 < time.monotonic() - started < 2
        assert router.pool.get("m").queue.waiting == 0
        await long


async def test_upstream_4xx_is_invalid_argument_with_its_type(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path, {"m": fake_model(tmp_path, "m")}, system={"llama_server_path": fake()}
    )
    async with running_router(settings) as (_, client):
        from clients import InvalidRequestError

        with pytest.raises(InvalidRequestError) as caught:
            await drain(client, "m", {**PROMPT, "max_tokens": 120000})
        assert caught.value.reason == "UPSTREAM_REJECTED"
        assert caught.value.metadata["upstream_type"] == "exceed_context_size_error"


async def test_lost_port_race_is_retried_and_not_a_failure(
    tmp_path: Path, fake, fake_model
) -> None:
    marker = tmp_path / "port-taken"
    settings = settings_for(
        tmp_path,
        {"m": fake_model(tmp_path, "m")},
        system={
            "llama_server_path": fake(f"--port-taken-once {marker}"),
            "model_load_max_retries": 0,
        },
    )
    async with running_router(settings) as (_, client):
        events = await drain(client, "m")
        model = await client.get_model("m")
    assert marker.exists()  # the first start really failed
    assert isinstance(events[-1], End)
    assert model.consecutive_failures == 0 and model.state == "ready"


async def test_model_file_deleted_or_corrupted_after_start(tmp_path: Path, tiny_chat: Path) -> None:
    copy = tmp_path / "model.gguf"
    shutil.copyfile(tiny_chat, copy)
    settings = settings_for(tmp_path, {"m": {"model_path": str(copy), "params": {"n_ctx": 2048}}})
    async with running_router(settings) as (_, client):
        assert isinstance((await drain(client, "m"))[-1], End)
        await client.unload("m")
        copy.write_bytes(b"GGUF" + b"\x00" * 4096)  # corrupted in place
        with pytest.raises(UnavailableError) as corrupted:
            await drain(client, "m")
        assert "could not be loaded" in corrupted.value.message
        assert_error_discloses_nothing(corrupted.value, secrets=[str(tmp_path)])
        assert (await client.get_model("m")).state == "failed"
        await client.reset("m")
        copy.unlink()
        with pytest.raises(UnavailableError) as deleted:
            await drain(client, "m")
        assert "does not exist" in deleted.value.message
        assert_error_discloses_nothing(deleted.value, secrets=[str(tmp_path)])


async def test_a_cancelled_waiter_leaves_the_queue_at_once(
    tmp_path: Path, fake, fake_model
) -> None:
    settings = settings_for(
        tmp_path,
        {"m": {**fake_model(tmp_path, "m"), "params": {"n_ctx": 131072, "parallel_override": 1}}},
        system={"llama_server_path": fake("--token-delay 0.01")},
    )
    async with running_router(settings) as (router, client):
        await client.load("m")
        queue = router.pool.get("m").queue
        running = asyncio.create_task(drain(client, "m", {**PROMPT, "max_tokens": 200}))
        await wait_until(lambda: queue.running == 1, 5)
        waiting = asyncio.create_task(drain(client, "m"))
        await wait_until(lambda: queue.waiting == 1, 5)
        waiting.cancel()
        await wait_until(lambda: queue.waiting == 0, 0.5)
        assert queue.counters.total_cancelled == 1
        await running
