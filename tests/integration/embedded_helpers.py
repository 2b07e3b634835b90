"""Run `python -m router.embedded` as a real child process and talk HTTP to it (stdlib only).

`embedded_server(...)` starts one on a free 127.0.0.1 port, waits for `/health` to answer 200 and
always kills and reaps it afterwards. The child's stderr (llama.cpp's log and the launcher's own
lines) goes to a file, so a failure message can show it and a full pipe can never stall the child.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = (sys.executable, "-m", "router.embedded")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL by PID (a no-op once it has exited) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def spawn_embedded(
    model: Path, *flags: str, log_path: Path, port: int | None = None
) -> EmbeddedServer:
    """Start the launcher without waiting for it; the caller must `kill()` it."""
    port = free_port() if port is None else port
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*LAUNCHER, "-m", str(model), "--host", HOST, "--port", str(port), *flags],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return EmbeddedServer(process, port, log_path)


def wait_healthy(server: EmbeddedServer, timeout: float = 20.0) -> None:
    """Poll `/health` until 200; fail early if the process exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            raise AssertionError(f"embedded server exited with {code}:\n{server.log()[-4000:]}")
        with contextlib.suppress(OSError):
            status, _ = request(server.port, "GET", "/health", timeout=1.0)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"embedded server not healthy within {timeout} s:\n{server.log()[-4000:]}"
            )
        time.sleep(0.01)


def wait_for_log(server: EmbeddedServer, pattern: str, timeout: float = 20.0) -> re.Match[str]:
    """The first match of the multiline regex `pattern` in the log, once it appears.

    `/health` can answer 200 a moment before the launcher prints its own "listening on" line.
    """
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, server.log(), re.M)):
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the log:\n{server.log()[-4000:]}")
        time.sleep(0.01)
    return found


@contextlib.contextmanager
def embedded_server(
    model: Path, *flags: str, log_path: Path, timeout: float = 20.0
) -> Iterator[EmbeddedServer]:
    """A healthy embedded server on a free port, killed and reaped on exit."""
    server = spawn_embedded(model, *flags, log_path=log_path)
    try:
        wait_healthy(server, timeout)
        yield server
    finally:
        server.kill()


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body). `body` is sent as JSON unless None."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_json(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    status, data = request(port, "GET", path, headers=headers)
    return status, json.loads(data)


def post_json(port: int, path: str, body: Any) -> tuple[int, Any]:
    status, data = request(port, "POST", path, body)
    return status, json.loads(data)


def sse_data(port: int, path: str, body: Any, timeout: float = 30.0) -> list[str]:
    """POST a streaming request and return the `data:` payloads in order, `[DONE]` included."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        events = []
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                events.append(line[len("data:") :].strip())
                if events[-1] == "[DONE]":
                    break
        return events
    finally:
        conn.close()
