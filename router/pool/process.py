"""One llama-server child process: spawn, output draining, readiness, stop.

The child runs in its own session (so its process group is its PID and signals
to the router's terminal do not reach it) and dies with the router through
PR_SET_PDEATHSIG. Spawning happens on the event-loop thread on purpose: the
death signal fires when the *thread* that forked exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

_LOGGER = logging.getLogger(__name__)
# Probes close their connection: an idle pooled socket per child would only sit there.
CLOSE = {"Connection": "close"}
_DRAIN_READ_BYTES = 65536
# SIGKILL cannot be ignored: a process not reaped this long after it is stuck in the kernel
# (e.g. in a GPU driver call) for as long as the kernel keeps it.
REAP_TIMEOUT_SEC = 5.0


class LogRing:
    """The last lines a child wrote, bounded; full output also goes to the log."""

    def __init__(self, max_lines: int) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)

    def append(self, line: str) -> None:
        self._lines.append(line)

    def tail(self, count: int) -> list[str]:
        if count <= 0:
            return []
        return list(self._lines)[-count:]


class ChildExited(Exception):
    """The child exited while the router was waiting for it."""

    def __init__(self, returncode: int) -> None:
        super().__init__(describe_exit(returncode))
        self.returncode = returncode


class ReadyTimeout(Exception):
    """The child did not answer /health with 200 before the deadline."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def free_port() -> int:
    """A loopback port the OS says is free now (the child may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def health_status(session: aiohttp.ClientSession, url: str, timeout: float) -> int | None:
    """The status of one GET of a child's /health, None when it does not answer in time."""
    try:
        async with session.get(
            url, headers=CLOSE, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


class ChildProcess:
    """A spawned child. ``exited`` resolves with its return code once it is reaped."""

    def __init__(
        self, process: asyncio.subprocess.Process, port: int, log: LogRing, name: str
    ) -> None:
        self._process = process
        self.port = port
        self.pid = process.pid
        self.log = log
        self._name = name
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Resolved by the next line of output; wait_ready replaces it before each probe.
        self._output: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_task = asyncio.create_task(self._drain(), name=f"drain:{name}")
        self._reap_task = asyncio.create_task(self._reap(), name=f"reap:{name}")

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str],
        log: LogRing,
        name: str,
    ) -> ChildProcess:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
        _LOGGER.info("%s: spawned pid %d on port %d", name, process.pid, port)
        return cls(process, port, log, name)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    @property
    def running(self) -> bool:
        return not self.exited.done()

    async def _drain(self) -> None:
        # Read whatever is there, not line by line: a busy child writes ~10 lines per
        # request, and one wake-up per line was a measurable share of the router's CPU.
        stream = self._process.stdout
        assert stream is not None
        child_log = logging.getLogger(f"router.child.{self._name}")
        partial = b""
        while True:
            raw = await stream.read(_DRAIN_READ_BYTES)
            if not raw:
                if partial:
                    self._keep(partial, child_log)
                return
            *lines, partial = (partial + raw).split(b"\n")
            if len(partial) > _DRAIN_READ_BYTES:  # a runaway line: keep its start only
                lines.append(partial[:_DRAIN_READ_BYTES])
                partial = b""
            for line in lines:
                self._keep(line, child_log)
            if not self._output.done():
                self._output.set_result(None)

    def _keep(self, raw: bytes, child_log: logging.Logger) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        self.log.append(line)
        child_log.debug("%s", line)

    async def _reap(self) -> None:
        returncode = await self._process.wait()
        # Let the drain finish so the last lines (often the reason) are in the ring.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drain_task), 1.0)
        _LOGGER.info("%s: pid %d %s", self._name, self.pid, describe_exit(returncode))
        if not self.exited.done():
            self.exited.set_result(returncode)

    async def wait_ready(
        self,
        session: aiohttp.ClientSession,
        timeout: float,
        on_loading: Callable[[], None] | None = None,
    ) -> None:
        """Poll this child's /health until 200, racing its exit and ``timeout``.

        Connection refused means the port is not bound yet; 503 means the
        weights are loading (``on_loading`` is called once). Besides the
        backoff, a probe follows each line the child writes: llama-server
        announces that it listens and that the model is loaded, so readiness
        is seen within a probe of it instead of at the next backoff step
        (up to 40 ms later for the tiny models, which are ready in ~60 ms).
        """
        url = self.health_url
        deadline = time.monotonic() + timeout
        delay = 0.005
        loading_seen = False
        loop = asyncio.get_running_loop()
        while True:
            if self.exited.done():
                raise ChildExited(self.exited.result())
            if self._output.done():
                self._output = loop.create_future()
            status = await health_status(session, url, timeout=1.0)
            if status == 200:
                return
            if status == 503 and not loading_seen and on_loading is not None:
                loading_seen = True
                on_loading()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReadyTimeout(f"not ready after {timeout:g} s")
            wakers: set[asyncio.Future[Any]] = {self.exited, self._output}
            await asyncio.wait(
                wakers,
                timeout=min(delay, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
            delay = min(delay * 2, 0.1)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace``, and reap. Idempotent.

        Returns the exit code, or None when the process is not reaped ``REAP_TIMEOUT_SEC``
        after SIGKILL: waiting on would hold the caller (a failed load keeping its device's
        load turn, an unload, the router's shutdown) for as long as the kernel keeps it.
        ``running`` then stays true, and ``exited`` resolves if it is reaped later.
        """
        if self.running:
            self._signal_group(signal.SIGTERM)
            done, _ = await asyncio.wait({self.exited}, timeout=grace)
            if not done:
                _LOGGER.warning("%s: pid %d ignored SIGTERM, killing", self._name, self.pid)
                self._signal_group(signal.SIGKILL)
        # The process itself, not `exited`: the reap task may have been cancelled (an event
        # loop closing cancels every task), and then `exited` would never resolve.
        try:
            returncode = await asyncio.wait_for(self._process.wait(), REAP_TIMEOUT_SEC)
        except asyncio.TimeoutError:
            _LOGGER.error(
                "%s: pid %d not reaped %g s after SIGKILL; going on without it",
                self._name,
                self.pid,
                REAP_TIMEOUT_SEC,
            )
            return None
        if not self.exited.done():
            self.exited.set_result(returncode)
        await asyncio.wait({self._drain_task})
        return returncode

    def kill(self) -> None:
        """SIGKILL the process group now (used when the child is hung)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
