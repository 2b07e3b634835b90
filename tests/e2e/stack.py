"""Real processes for end-to-end tests: a router and a facade on free loopback ports.

Every process started here is reaped by PID in a `finally`, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import PYTHON, free_port, router_process, spawn_logged, write_config


@dataclass(frozen=True)
class Stack:
    """A running router + facade pair."""

    config: Path
    grpc_port: int
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, wait, SIGKILL if needed; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def http_status(
    url: str, timeout: float = 1.0, context: ssl.SSLContext | None = None
) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def wait_for_http(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float,
    expect: int = 200,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll `url` until it answers `expect`, failing fast if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise AssertionError(f"process exited with {process.returncode}:\n{stderr}")
        if http_status(url, timeout=0.5, context=context) == expect:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {expect} within {timeout} s")


@contextlib.contextmanager
def facade_process(
    config: Path,
    port: int,
    *,
    health: int = 200,
    context: ssl.SSLContext | None = None,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m facade -c config`` as a real process on ``port``, once ``/health`` answers
    ``health`` (200: the router is connected); over HTTPS with ``context``. Its log goes to a
    pipe (read if it fails to start) or, for long runs, to the file ``log``."""
    process = spawn_logged([PYTHON, "-m", "facade", "-c", str(config)], log)
    try:
        scheme = "http" if context is None else "https"
        url = f"{scheme}://127.0.0.1:{port}/health"
        wait_for_http(url, process, timeout=20, expect=health, context=context)
        yield process
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_stack(
    directory: Path,
    models: Mapping[str, Any],
    *,
    system: Mapping[str, Any] | None = None,
    api: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Iterator[Stack]:
    """Router and facade processes serving `models`, both stopped (and reaped) after.

    `api` and `sections` (e.g. `auth`) go into the config; the ports are chosen here.
    """
    grpc_port, http_port = free_port(), free_port()
    config = write_config(
        directory,
        models,
        system=system,
        grpc_port=grpc_port,
        api={**(api or {}), "port": http_port},
        **sections,
    )
    with router_process(config, grpc_port), facade_process(config, http_port):
        yield Stack(config, grpc_port, http_port)


def post_json(url: str, body: Mapping[str, Any], timeout: float = 30) -> tuple[int, Any]:
    """POST JSON, returning (status, decoded body) for success and errors alike."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_json(url: str, timeout: float = 30) -> tuple[int, Any]:
    """GET, returning (status, decoded body) for success and errors alike."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
