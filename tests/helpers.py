"""Shared test helpers: configs on disk, in-process routers, router processes, polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from clients import Chunk, RouterClient
from router.config import Settings, load_settings
from router.resources.devices import Inventory
from router.server import Router

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ROUTERMODEL_TEST_CACHE", REPO / ".pytest_cache" / "routermodel"))
PYTHON = sys.executable

# Fast, quiet defaults for routers under test; a test overrides what it exercises.
TEST_SYSTEM: dict[str, Any] = {
    "cpu_threads": 1,
    "parallel_requests": 2,
    "request_timeout_sec": 30,
    "queue_timeout_sec": 30,
    "wait_ready_sec": 30,
    "probe_interval_sec": 3600,
    "stop_grace_sec": 2,
    "failure_cooldown_sec": 30,
    "enable_idle_timeout": False,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(
    directory: Path,
    models: Mapping[str, Any],
    *,
    system: Mapping[str, Any] | None = None,
    grpc_port: int = 0,
    grpc_tls: Mapping[str, str] | None = None,
    **sections: Any,
) -> Path:
    grpc: dict[str, Any] = {"host": "127.0.0.1", "port": grpc_port, "grace_sec": 2}
    if grpc_tls is not None:
        grpc["tls"] = dict(grpc_tls)
    config = {
        "grpc": grpc,
        "system": {**TEST_SYSTEM, "state_dir": str(directory / "state"), **(system or {})},
        "models": dict(models),
        **sections,
    }
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def settings_for(directory: Path, models: Mapping[str, Any], **kwargs: Any) -> Settings:
    return load_settings(write_config(directory, models, **kwargs), env={})


def chat_model(path: Path, **params: Any) -> dict[str, Any]:
    return {"model_path": str(path), "params": {"n_ctx": 4096, **params}}


def embed_model(path: Path, **params: Any) -> dict[str, Any]:
    return {
        "model_path": str(path),
        "params": {"n_ctx": 2048, "embedding": True, "ubatch_size": 2048, "batch_override": 2048}
        | params,
    }


def fake_server(directory: Path, *knobs: str) -> str:
    """An executable that runs the fake llama-server with ``knobs`` (for llama_server_path)."""
    script = directory / f"fake-llama-server-{abs(hash(knobs))}"
    args = " ".join(knobs)
    script.write_text(
        f'#!/bin/sh\ncd "{REPO}"\nexec "{PYTHON}" -m tests.fakes.llama_server {args} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


@contextlib.asynccontextmanager
async def running_router(
    settings: Settings, inventory: Inventory | None = None
) -> AsyncIterator[tuple[Router, RouterClient]]:
    """A real router (real gRPC socket, real children) inside the test's event loop."""
    router = Router(settings, inventory=inventory)
    port = await router.start()
    client = RouterClient(f"127.0.0.1:{port}")
    try:
        yield router, client
    finally:
        await client.close()
        await router.stop()


async def seconds_to_first_chunk(client: RouterClient, model: str, body: dict[str, Any]) -> float:
    """How long a streamed request waits for its first chunk (its slot, then the model);
    the rest of the stream is dropped, which cancels the call."""
    started = time.monotonic()
    async for event in client.generate(model, {**body, "stream": True}):
        if isinstance(event, Chunk):
            break
    return time.monotonic() - started


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, step: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def spawn_logged(argv: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository with stderr to a pipe, or to the file ``log``."""
    if log is None:
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with log.open("wb") as handle:  # the child keeps its own copy
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=handle)


@contextlib.contextmanager
def router_process(
    config: Path,
    port: int,
    *extra: str,
    credentials: grpc.ChannelCredentials | None = None,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m router -c config`` as a real process, ready on ``port``; reaped after.

    ``credentials`` reach a router serving TLS. Its log goes to a pipe read only if it fails
    to start, or to the file ``log``: a long run logs more than a pipe holds, and a router
    blocked writing its log stops serving.
    """
    process = spawn_logged([PYTHON, "-m", "router", "-c", str(config), *extra], log)
    try:
        wait_for_grpc(port, process, timeout=20, credentials=credentials)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


def wait_for_grpc(
    port: int,
    process: subprocess.Popen[bytes],
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise AssertionError(f"router exited with {process.returncode}:\n{stderr}")
        target = f"127.0.0.1:{port}"
        channel = (
            grpc.insecure_channel(target)
            if credentials is None
            else grpc.secure_channel(target, credentials)
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=0.2)
            return
        except grpc.FutureTimeoutError:
            pass
        finally:
            channel.close()
    raise AssertionError(f"router not serving on {port} within {timeout} s")


def established_connections(port: int, *, side: str = "server") -> int:
    """Established TCP connections on ``port``: accepted by its server (``side="server"``),
    or opened to it by clients (``side="client"``)."""
    column = 1 if side == "server" else 2  # local or remote address
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if int(fields[column].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1  # 01 = ESTABLISHED
    return count
