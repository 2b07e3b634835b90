"""Faults with real router, facade and llama-server processes, seen from HTTP.

tests/integration/test_pool_faults.py covers the router's own handling (hung child, crash loop,
port race, bad model file...); here are the faults that need whole processes — the router or
the facade killed and restarted, slow and vanishing HTTP clients — and the HTTP side of a child
dying, hanging or failing to load. Every error a client receives passes the disclosure check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from clients import RouterClient, RouterError
from tests.disclosure import assert_no_disclosure
from tests.e2e.stack import facade_process, get_json, http_status, stop_process
from tests.helpers import (
    PYTHON,
    established_connections,
    fake_server,
    free_port,
    pid_alive,
    spawn_logged,
    wait_for_grpc,
    write_config,
)
from tests.procfs import children, rss_bytes

PROMPT = [{"role": "user", "content": "hi"}]
# The fake llama-server refuses more; its model entry claims a context this large.
LONG = 99_999


def fake_model(directory: Path, tiny_chat: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A model served by the fake llama-server (the router reads the real GGUF's header)."""
    path = directory / f"{name}.gguf"
    path.symlink_to(tiny_chat)
    return {"model_path": str(path), "params": {"n_ctx": 131072}, **extra}


class Processes:
    """A router and a facade on fixed ports that a test may kill and restart; every process
    started is reaped by PID when the test ends."""

    def __init__(self, config: Path, grpc_port: int, http_port: int) -> None:
        self.config, self.grpc_port, self.http_port = config, grpc_port, http_port
        self.router: subprocess.Popen[bytes] | None = None
        self.facade: subprocess.Popen[bytes] | None = None
        self._facade_context: contextlib.ExitStack = contextlib.ExitStack()
        self.started: list[subprocess.Popen[bytes]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start_router(self) -> subprocess.Popen[bytes]:
        # Logs to files, one per start: read them when a test fails.
        log = self.config.parent / f"router-{len(self.started)}.log"
        self.router = spawn_logged([PYTHON, "-m", "router", "-c", str(self.config)], log)
        self.started.append(self.router)
        wait_for_grpc(self.grpc_port, self.router, timeout=20)
        return self.router

    def start_facade(self, health: int = 200) -> subprocess.Popen[bytes]:
        log = self.config.parent / f"facade-{len(self.started)}.log"
        self.facade = self._facade_context.enter_context(
            facade_process(self.config, self.http_port, health=health, log=log)
        )
        self.started.append(self.facade)
        return self.facade

    def close(self) -> None:
        self._facade_context.close()
        for process in reversed(self.started):
            stop_process(process)


@contextlib.contextmanager
def processes(
    directory: Path, models: dict[str, Any], system: dict[str, Any] | None = None
) -> Iterator[Processes]:
    grpc_port, http_port = free_port(), free_port()
    config = write_config(
        directory, models, system=system, grpc_port=grpc_port, api={"port": http_port}
    )
    running = Processes(config, grpc_port, http_port)
    try:
        running.start_router()
        running.start_facade()
        yield running
    finally:
        running.close()


async def model_status(session: aiohttp.ClientSession, alias: str) -> dict[str, Any]:
    async with session.get(f"/v1/models/status/{alias}") as response:
        assert response.status == 200
        model: dict[str, Any] = (await response.json())["model"]
        return model


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.05)


async def read_stream(response: aiohttp.ClientResponse) -> tuple[int, list[Any]]:
    """(data frames, error envelopes) of an SSE response read to its end."""
    frames, errors = 0, []
    async for line in response.content:
        if line.startswith(b"data: {"):
            payload = json.loads(line[len(b"data: ") :])
            if "error" in payload:
                errors.append(payload)
            else:
                frames += 1
    return frames, errors


def assert_clean_error(body: Any, *, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """An OpenAI error envelope that discloses nothing internal."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert_no_disclosure(json.dumps(body), secrets=secrets)
    return error


def chat(max_tokens: int, stream: bool, model: str = "chat") -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": stream}


@contextlib.asynccontextmanager
async def session_for(base_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


# The router and the facade as processes


async def test_router_killed_and_restarted_while_the_facade_runs(
    tmp_path: Path, tiny_chat: Path
) -> None:
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat")}
    system = {"llama_server_path": fake_server(tmp_path, "--token-delay 0.01")}
    with processes(tmp_path, models, system) as running:
        async with session_for(running.base_url) as session:
            async with session.post("/v1/chat/completions", json=chat(LONG, True)) as stream:
                assert (await stream.content.readuntil(b"\n\n")).startswith(b"data: {")
                child = (await model_status(session, "chat"))["pid"]
                assert child and pid_alive(child)
                assert running.router is not None
                running.router.kill()  # SIGKILL: no cleanup code runs in the router
                running.router.wait(10)
                frames, errors = await asyncio.wait_for(read_stream(stream), 10)
            # The stream ends with an error frame, not a hang or a torn connection.
            assert len(errors) == 1, frames
            assert assert_clean_error(errors[0])["type"] == "server_error"

            deadline = time.monotonic() + 10
            while pid_alive(child):  # no orphan: the child dies with its router
                assert time.monotonic() < deadline, "the child outlived its router"
                await asyncio.sleep(0.05)
            assert http_status(running.base_url + "/health") == 503
            async with session.post("/v1/chat/completions", json=chat(2, False)) as refused:
                assert refused.status == 503
                error = assert_clean_error(await refused.json())
                assert error["code"] == "router_unavailable"
                assert int(refused.headers["Retry-After"]) >= 1

            running.start_router()  # same port, same state directory

            async def serving() -> bool:
                return http_status(running.base_url + "/health") == 200

            # The facade finds the new router by itself, within its reconnect backoff.
            await wait_for(serving, 10, "the facade reconnects")
            async with session.post("/v1/chat/completions", json=chat(3, False)) as answer:
                assert answer.status == 200
                assert (await answer.json())["usage"]["completion_tokens"] == 3
            new_child = (await model_status(session, "chat"))["pid"]
            assert new_child != child and pid_alive(new_child)
        assert running.router is not None
        router = running.router.pid
        assert children(router) == [new_child]
    assert not pid_alive(new_child)


async def test_facade_restarted_while_the_router_keeps_serving(
    tmp_path: Path, tiny_chat: Path
) -> None:
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat")}
    system = {"llama_server_path": fake_server(tmp_path, "--token-delay 0.01")}
    with processes(tmp_path, models, system) as running:
        async with (
            session_for(running.base_url) as session,
            RouterClient(f"127.0.0.1:{running.grpc_port}") as client,
        ):
            async with session.post("/v1/models/chat/load", json={"wait": True}) as loaded:
                assert loaded.status == 200
            before = await (await session.get("/v1/models/status")).json()
            async with session.post("/v1/chat/completions", json=chat(LONG, True)) as stream:
                await stream.content.readuntil(b"\n\n")
                assert (await client.get_model("chat")).in_flight == 1
                assert running.facade is not None
                running.facade.kill()  # mid-stream, its client still connected
                running.facade.wait(10)

                async def slot_freed() -> bool:
                    return (await client.get_model("chat")).in_flight == 0

                await wait_for(slot_freed, 5, "the router frees the slot of a vanished facade")
        running.start_facade()

        async with session_for(running.base_url) as session:
            after = await (await session.get("/v1/models/status")).json()
            async with session.post("/v1/chat/completions", json=chat(3, False)) as answer:
                assert answer.status == 200
    # The router's state survived: same run, same child, still loaded.
    assert after["server"]["epoch"] == before["server"]["epoch"]
    [model_before], [model_after] = before["models"], after["models"]
    assert model_after["state"] == model_before["state"] == "MODEL_STATE_READY"
    assert model_after["pid"] == model_before["pid"] and model_after["restarts"] == 0


# Clients that read slowly or leave


def slow_reader(port: int, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP client with a tiny receive buffer, so the facade meets backpressure at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    return sock


async def test_a_slow_reader_holds_bounded_memory_and_frees_its_slot(
    tmp_path: Path, tiny_chat: Path
) -> None:
    # No token delay: the fake writes its ~15 MB stream as fast as the router takes it.
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat")}
    system = {"llama_server_path": fake_server(tmp_path)}
    with processes(tmp_path, models, system) as running:
        assert running.router is not None and running.facade is not None
        pids = {"router": running.router.pid, "facade": running.facade.pid}
        async with session_for(running.base_url) as session:
            async with session.post("/v1/models/chat/load", json={"wait": True}) as loaded:
                assert loaded.status == 200
            # Warm both processes up with a stream read at full speed, so allocator arenas and
            # connection pools exist before the baseline.
            async with session.post("/v1/chat/completions", json=chat(2000, True)) as warm:
                assert (await read_stream(warm))[0] >= 2000
            baseline = {name: rss_bytes(pid) for name, pid in pids.items()}

            sock = await asyncio.to_thread(slow_reader, running.http_port, chat(LONG, True))
            try:
                received = 0
                for _ in range(60):  # ~1 KiB every 50 ms for 3 s: a 20 KiB/s reader
                    received += len(await asyncio.to_thread(sock.recv, 1024))
                    await asyncio.sleep(0.05)
                assert received > 0
                assert (await model_status(session, "chat"))["in_flight"] == 1
                grown = {name: rss_bytes(pid) - baseline[name] for name, pid in pids.items()}
            finally:
                sock.close()

            async def slot_freed() -> bool:
                return bool((await model_status(session, "chat"))["in_flight"] == 0)

            await wait_for(slot_freed, 5, "the slot is freed when the slow reader leaves")
    # Unbounded buffering would hold most of the ~15 MB stream (several times that as Python
    # objects); flow control keeps each process within socket and HTTP/2 window sizes.
    assert max(grown.values()) < 12 * 1024 * 1024, grown


async def test_a_disconnect_storm_leaves_no_busy_slot_and_no_waiter(
    tmp_path: Path, tiny_chat: Path
) -> None:
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat", params={"n_ctx": 131072,
              "parallel_override": 2})}  # fmt: skip
    system = {"llama_server_path": fake_server(tmp_path, "--token-delay 0.01")}
    clients = 40
    with processes(tmp_path, models, system) as running:
        async with session_for(running.base_url) as session:
            async with session.post("/v1/models/chat/load", json={"wait": True}) as loaded:
                assert loaded.status == 200

            async def leave_early(index: int) -> None:
                # Each leaves at its own moment: mid-stream (or mid-generation, not streamed)
                # for those with a slot, while queued for the others. Its own session: leaving
                # closes its connection.
                stream = index % 2 == 0
                async with aiohttp.ClientSession(running.base_url) as own:

                    async def read() -> None:
                        async with own.post("/v1/chat/completions", json=chat(LONG, stream)) as got:
                            await got.content.readuntil(b"\n\n")
                            await asyncio.sleep(10)

                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(read(), 0.05 + (index % 10) * 0.05)

            await asyncio.gather(*(leave_early(index) for index in range(clients)))

            async def settled() -> bool:
                async with session.get("/v1/queue/stats") as response:
                    summary = (await response.json())["summary"]
                model = await model_status(session, "chat")
                return bool(
                    summary["total_queued"] == summary["total_processing"] == 0
                    and model["in_flight"] == model["queued"] == 0
                )

            await wait_for(settled, 5, "every slot and queue place is released")
            # Both slots really serve again, at once (a leaked one would wait out the 30 s
            # queue timeout).
            started = time.monotonic()
            answers = await asyncio.gather(
                *(session.post("/v1/chat/completions", json=chat(3, False)) for _ in range(2))
            )
            assert [answer.status for answer in answers] == [200, 200]
            assert time.monotonic() - started < 5
            for answer in answers:
                answer.release()
        assert established_connections(running.http_port) == 0


# The HTTP side of child faults


async def test_a_child_killed_mid_stream_is_a_clean_error_frame_then_served_again(
    tmp_path: Path, tiny_chat: Path
) -> None:
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat")}
    system = {"llama_server_path": fake_server(tmp_path, "--token-delay 0.01")}
    with processes(tmp_path, models, system) as running:
        async with (
            session_for(running.base_url) as session,
            RouterClient(f"127.0.0.1:{running.grpc_port}") as client,
        ):
            async with session.post("/v1/chat/completions", json=chat(LONG, True)) as stream:
                await stream.content.readuntil(b"\n\n")
                direct = client.generate("chat", chat(LONG, True))
                await anext(direct)
                os.kill((await model_status(session, "chat"))["pid"], signal.SIGKILL)
                _, errors = await asyncio.wait_for(read_stream(stream), 10)
            with pytest.raises(RouterError) as grpc_error:
                async for _ in direct:
                    pass
            assert len(errors) == 1
            assert assert_clean_error(errors[0], secrets=(str(tmp_path),))["type"] == (
                "server_error"
            )
            # What a gRPC caller gets: the status message and its details.
            details = f"{grpc_error.value.message} {dict(grpc_error.value.metadata)}"
            assert_no_disclosure(details, secrets=(str(tmp_path),), where="gRPC status")

            async with session.post("/v1/chat/completions", json=chat(3, False)) as answer:
                assert answer.status == 200  # the child was restarted


async def test_a_hung_child_times_out_cleanly(tmp_path: Path, tiny_chat: Path) -> None:
    models = {"chat": fake_model(tmp_path, tiny_chat, "chat")}
    system = {
        "llama_server_path": fake_server(tmp_path, "--token-delay 0.01"),
        "request_timeout_sec": 1,
    }
    with processes(tmp_path, models, system) as running:
        async with session_for(running.base_url) as session:
            async with session.post("/v1/models/chat/load", json={"wait": True}) as loaded:
                assert loaded.status == 200
            child = (await model_status(session, "chat"))["pid"]
            os.kill(child, signal.SIGSTOP)
            try:
                async with session.post("/v1/chat/completions", json=chat(5, False)) as answer:
                    assert answer.status == 504
                    error = assert_clean_error(await answer.json())
                async with session.post("/v1/chat/completions", json=chat(5, True)) as stream:
                    assert stream.status == 504
                    streamed = assert_clean_error(await stream.json())
            finally:
                os.kill(child, signal.SIGCONT)
    assert error["code"] == streamed["code"] == "upstream_timeout"


async def test_a_model_that_cannot_load_says_so_without_its_path_or_log(
    tmp_path: Path, tiny_chat: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    models = {
        "broken": {"model_path": str(broken)},
        "missing": {"model_path": str(tmp_path / "missing.gguf")},
        "crashing": fake_model(tmp_path, tiny_chat, "crashing"),
    }
    crashing = fake_server(
        tmp_path, "--exit-at-start 1", f"--exit-message 'error: failed to load model {broken}'"
    )
    system = {"llama_server_path": crashing, "model_load_max_retries": 0}
    with processes(tmp_path, models, system) as running:
        async with session_for(running.base_url) as session:
            for alias in ("broken", "missing", "crashing"):
                for path, body in (
                    ("/v1/chat/completions", chat(2, False, alias)),
                    ("/v1/chat/completions", chat(2, True, alias)),
                    (f"/v1/models/{alias}/load", {"wait": True}),
                ):
                    async with session.post(path, json=body) as answer:
                        assert answer.status == 503, (alias, path)
                        assert_clean_error(await answer.json(), secrets=(str(tmp_path),))
                status = await model_status(session, alias)
                assert_no_disclosure(status["last_error"], secrets=(str(tmp_path),))
            _, failed = get_json(running.base_url + "/v1/models/failed")
            assert_no_disclosure(json.dumps(failed), secrets=(str(tmp_path),))
