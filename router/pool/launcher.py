"""Starting children: the death-signal wrapper, and a spare embedded launcher kept ready.

Most of an embedded child's cold start is not its model: a new `python -m router.embedded`
spends ~20-25 ms starting Python and ~40 ms importing xllamacpp before it reads a flag (the
tiny test models then load in ~17 ms). So the pool keeps one spare started ahead of need,
`python -m router.embedded --flags-from-stdin`, which has done both and waits for its flags on
stdin. The next embedded child whose environment is the spare's is the spare, given its flags;
a new spare starts once that child's load is over, not during it (it would compete for the CPU).

A spare dies with the router: the same death signal as any child, and end of input on its
stdin. Only in CPU mode: on a GPU each child's environment names its device, and that must be
set before the import. `ps` shows an adopted child as `... --flags-from-stdin`; its model's
status has its pid, and the log line that adopted it has its flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence

from router.pool.command import EMBEDDED_SERVER, FLAGS_FROM_STDIN, with_death_signal
from router.pool.process import ChildProcess, LogRing
from router.tasks import BackgroundTasks

_LOGGER = logging.getLogger(__name__)
# How long a spare told to stop (end of input) gets before it is killed.
SPARE_STOP_SEC = 2.0
_OUTPUT_TAIL_BYTES = 4096


class Launcher:
    """Starts the children of one pool; ``spare_env`` None means no spare is kept."""

    def __init__(self, setpriv: str | None, spare_env: Mapping[str, str] | None) -> None:
        self._setpriv = setpriv
        self._spare_env = None if spare_env is None else dict(spare_env)
        self._spare: asyncio.subprocess.Process | None = None
        self._starting = False
        self._closed = False
        self._tasks = BackgroundTasks()

    @property
    def spare_pid(self) -> int | None:
        """The pid of the spare waiting for a model, if there is one."""
        return None if self._spare is None else self._spare.pid

    async def launch(
        self, command: Sequence[str], *, port: int, env: Mapping[str, str], log: LogRing, name: str
    ) -> ChildProcess:
        """Start ``command`` as a child: the spare if it can serve it, else a new process."""
        process = self._adopt(command, env)
        if process is None:
            argv = with_death_signal(command, self._setpriv)
            return await ChildProcess.spawn(argv, port=port, env=env, log=log, name=name)
        _LOGGER.info(
            "%s: spare pid %d serves it on port %d with %s",
            name,
            process.pid,
            port,
            " ".join(command[len(EMBEDDED_SERVER) :]),
        )
        return ChildProcess(process, port, log, name)

    def replenish(self) -> None:
        """Start a new spare in the background if there is none (after a load is over)."""
        if self._spare_env is None or self._spare is not None or self._starting or self._closed:
            return
        self._starting = True
        self._tasks.spawn(self._start_spare(self._spare_env), "spare-launcher")

    async def close(self) -> None:
        """Stop the spare (end of input, then SIGKILL) and stop starting new ones."""
        self._closed = True
        await self._tasks.cancel_all()
        spare, self._spare = self._spare, None
        if spare is not None:
            await _stop(spare)

    def _adopt(
        self, command: Sequence[str], env: Mapping[str, str]
    ) -> asyncio.subprocess.Process | None:
        # No await in here: a cancellation (a forced unload) must not find the spare given
        # its flags but not yet the caller's child, which nothing would then stop.
        spare = self._spare
        if (
            spare is None
            or spare.returncode is not None
            or tuple(command[: len(EMBEDDED_SERVER)]) != EMBEDDED_SERVER
            or dict(env) != self._spare_env
        ):
            return None
        self._spare = None
        stdin = spare.stdin
        assert stdin is not None
        # One short line: the pipe takes it whole at once (or the transport keeps the rest).
        stdin.write(json.dumps(list(command[len(EMBEDDED_SERVER) :])).encode() + b"\n")
        if stdin.is_closing():  # the write failed: it died just now; start a new process
            self._tasks.spawn(_stop(spare), "spare-stop")
            return None
        stdin.close()
        return spare

    async def _start_spare(self, env: dict[str, str]) -> None:
        argv = with_death_signal([*EMBEDDED_SERVER, FLAGS_FROM_STDIN], self._setpriv)
        try:
            spare = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # as every child: its own process group
            )
        finally:
            self._starting = False
        if self._closed:
            await _stop(spare)
            return
        self._spare = spare
        _LOGGER.debug("spare launcher pid %d started", spare.pid)
        returncode = await spare.wait()
        if self._spare is spare:  # it ended before any model needed it
            self._spare = None
            output = b""
            if spare.stdout is not None:
                output = await spare.stdout.read(_OUTPUT_TAIL_BYTES)
            self._spare_env = None  # something is wrong with it: every child starts afresh
            _LOGGER.warning(
                "spare launcher pid %d ended before use (status %d); children start without "
                "one: %s",
                spare.pid,
                returncode,
                output.decode("utf-8", "replace").strip()[-500:] or "no output",
            )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()  # end of input: an idle spare exits by itself
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), SPARE_STOP_SEC)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
