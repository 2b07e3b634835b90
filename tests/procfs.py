"""What /proc says about a process: resident memory, open file descriptors, children."""

from __future__ import annotations

import os
from pathlib import Path

from router.pool.command import FLAGS_FROM_STDIN

__all__ = [
    "children",
    "command_line",
    "environment",
    "launchers_from_stdin",
    "open_fds",
    "rss_bytes",
]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(child) for child in text.split()]
    return found


def command_line(pid: int) -> list[str]:
    """The argv `pid` runs with."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [arg.decode() for arg in raw.split(b"\0")[:-1]]


def environment(pid: int) -> list[str]:
    """The environment `pid` started with, as NAME=value strings."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return [item.decode() for item in raw.split(b"\0") if item]


def launchers_from_stdin(pid: int) -> list[int]:
    """The children of `pid` started as spare launchers (idle, or adopted since by a model)."""
    return [child for child in children(pid) if command_line(child)[-1] == FLAGS_FROM_STDIN]
