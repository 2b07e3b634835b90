"""The per-instance state directory: which children this router started.

PR_SET_PDEATHSIG already kills children when the router dies; this is the
second line. Each child is recorded as (pid, kernel start time) so a restarted
router can stop exactly its own leftovers and never a recycled PID or another
instance's child. An exclusive lock keeps two routers off one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import time
from pathlib import Path

_LOGGER = logging.getLogger(__name__)


class StateDirInUse(RuntimeError):
    """Another live router holds this state directory."""


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall


# The name new_api_key gives a child's key file: leftovers of an earlier run are removed at
# start, and nothing else in the folder is (it may be one the operator chose for other files).
_KEY_FILE = re.compile(r".+-[0-9a-f]{8}\.key")


class ChildRegistry:
    """Records of live children in ``state_dir``; methods do blocking file I/O
    (tiny, rare) and are meant to be called through ``asyncio.to_thread``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._children = state_dir / "children"
        self._keys = state_dir / "keys"
        self._lock_file: int | None = None

    def acquire(self) -> None:
        self._children.mkdir(parents=True, exist_ok=True)
        self._keys.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(
                f"state directory {self.state_dir} is used by another running router; "
                "give this one its own system.state_dir or grpc.port"
            ) from None
        self._lock_file = fd

    def release(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def reap_leftovers(self, timeout: float = 5.0) -> list[int]:
        """Kill children recorded by an earlier run of this instance; return their PIDs."""
        killed: list[int] = []
        for record in sorted(self._children.glob("*.json")):
            try:
                data = json.loads(record.read_text())
                pid, ticks = int(data["pid"]), int(data["start_ticks"])
            except (OSError, ValueError, KeyError, TypeError):
                record.unlink(missing_ok=True)
                continue
            if process_start_ticks(pid) == ticks:
                _LOGGER.warning("stopping leftover child pid %d (%s)", pid, data.get("alias"))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            record.unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while any(process_start_ticks(pid) is not None for pid in killed):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        for key in self._keys.glob("*.key"):
            if _KEY_FILE.fullmatch(key.name):  # only what new_api_key wrote, nothing else
                key.unlink(missing_ok=True)
        return killed

    def record(self, alias: str, pid: int) -> None:
        ticks = process_start_ticks(pid)
        if ticks is None:
            return
        _write_atomic(
            self._children / f"{pid}.json",
            json.dumps({"pid": pid, "start_ticks": ticks, "alias": alias}),
        )

    def forget(self, pid: int) -> None:
        (self._children / f"{pid}.json").unlink(missing_ok=True)

    def new_api_key(self, alias: str) -> tuple[str, Path]:
        """A random key for one child and the 0600 file that hands it over (see _KEY_FILE)."""
        key = secrets.token_urlsafe(32)
        path = self._keys / f"{alias}-{secrets.token_hex(4)}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        return key, path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
