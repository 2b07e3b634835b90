"""NVIDIA GPUs through NVML (``pynvml`` from the nvidia-ml-py package), when present.

Memory per model is measured per process (``nvmlDeviceGetComputeRunningProcesses``),
not as a device-wide delta, so other GPU users do not distort it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType

from router.resources.devices import DeviceInfo

_LOGGER = logging.getLogger(__name__)
_MIB = 1024 * 1024


class NvmlGpus:
    cpu_mode = False

    def __init__(self, nvml: ModuleType, indices: Sequence[int]) -> None:
        self._nvml = nvml
        self._handles = {index: nvml.nvmlDeviceGetHandleByIndex(index) for index in indices}

    def devices(self) -> list[DeviceInfo]:
        devices = []
        for index, handle in self._handles.items():
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            name = self._nvml.nvmlDeviceGetName(handle)
            devices.append(
                DeviceInfo(
                    f"gpu:{index}",
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.total) // _MIB,
                    int(memory.used) // _MIB,
                )
            )
        return devices

    def process_memory_mib(self, pid: int) -> int | None:
        total = 0
        found = False
        for handle in self._handles.values():
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except self._nvml.NVMLError:
                return None
            for process in processes:
                if process.pid == pid and process.usedGpuMemory is not None:
                    total += int(process.usedGpuMemory) // _MIB
                    found = True
        return total if found else None


def open_nvml(indices: Sequence[int]) -> NvmlGpus | None:
    """NVML over the configured GPU indices, or None (no library, no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as error:
        _LOGGER.debug("NVML unavailable: %s", error)
        return None
    present = [index for index in indices if index < count]
    missing = sorted(set(indices) - set(present))
    if missing:
        _LOGGER.warning("gpu_devices %s do not exist (found %d GPUs)", missing, count)
    if not present:
        return None
    return NvmlGpus(pynvml, present)
