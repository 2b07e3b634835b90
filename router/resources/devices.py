"""Memory budgets the router places models on: GPUs through NVML, simulated GPUs, or the host.

``Inventory`` is the seam: the real NVML implementation, a simulated one
described in configuration (demos and tests without a GPU), and the host's RAM
when there is no GPU to manage (CPU mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str  # "gpu:<index>" or "cpu"
    name: str
    total_mib: int
    used_mib: int
    simulated: bool = False


class Inventory(Protocol):
    @property
    def cpu_mode(self) -> bool: ...

    def devices(self) -> list[DeviceInfo]: ...

    def process_memory_mib(self, pid: int) -> int | None:
        """Device memory used by ``pid``, None when it cannot be measured."""
        ...


def _meminfo_mib(path: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(total, used) host RAM in MiB, used = total - available."""
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0])  # kB
    total = values.get("MemTotal", 0) // 1024
    available = values.get("MemAvailable", values.get("MemFree", 0)) // 1024
    return total, max(0, total - available)


class HostMemory:
    """CPU mode: one budget, the host's RAM (or a configured budget)."""

    cpu_mode = True

    def __init__(self, budget_mib: int | None = None) -> None:
        self._budget = budget_mib

    def devices(self) -> list[DeviceInfo]:
        total, used = _meminfo_mib()
        return [DeviceInfo("cpu", "host memory", self._budget or total, used)]

    def process_memory_mib(self, pid: int) -> int | None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
        return None


@dataclass(frozen=True, slots=True)
class SimulatedGpu:
    name: str
    total_mib: int
    used_mib: int = 0


class SimulatedGpus:
    """GPUs described in configuration. Used memory is what others use; the router's
    own models count through their estimates (nothing runs on a simulated GPU)."""

    cpu_mode = False

    def __init__(self, gpus: Sequence[SimulatedGpu], indices: Sequence[int]) -> None:
        self._gpus = {index: gpus[index] for index in indices}

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(f"gpu:{index}", gpu.name, gpu.total_mib, gpu.used_mib, simulated=True)
            for index, gpu in self._gpus.items()
        ]

    def process_memory_mib(self, pid: int) -> int | None:
        return None
