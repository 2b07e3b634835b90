"""NVIDIA GPUs through NVML (``pynvml`` from the nvidia-ml-py package), when present.

Memory per model is measured per process (``nvmlDeviceGetComputeRunningProcesses``),
not as a device-wide delta, so other GPU users do not distort it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from router.resources.devices import DeviceInfo

_LOGGER = logging.getLogger(__name__)
_MIB = 1024 * 1024


class NvmlGpus:
    cpu_mode = False

    def __init__(self, nvml: ModuleType, indices: Sequence[int]) -> None:
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        self._last: dict[int, DeviceInfo] = {}  # each GPU's last good reading
        self._unreadable: set[int] = set()
        for index in indices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                self._last[index] = self._read(index, handle)
            except nvml.NVMLError as error:  # no permission, or the GPU is lost
                _LOGGER.warning("gpu %d: NVML cannot read it (%s); it is not used", index, error)
                continue
            self._handles[index] = handle

    def devices(self) -> list[DeviceInfo]:
        """Each GPU as NVML reads it now. One it can no longer read (lost, or its driver in
        trouble) counts as full, at its last known size: nothing more is placed on it, and
        admissions, reports and metrics go on for the others."""
        devices = []
        for index, handle in self._handles.items():
            try:
                device = self._read(index, handle)
            except self._nvml.NVMLError as error:
                if index not in self._unreadable:
                    self._unreadable.add(index)
                    _LOGGER.warning(
                        "gpu %d: NVML cannot read it (%s); counted as full until it can",
                        index,
                        error,
                    )
                last = self._last[index]
                device = dataclasses.replace(last, used_mib=last.total_mib)
            else:
                if index in self._unreadable:
                    self._unreadable.discard(index)
                    _LOGGER.warning("gpu %d: NVML reads it again", index)
                self._last[index] = device
            devices.append(device)
        return devices

    def _read(self, index: int, handle: Any) -> DeviceInfo:
        memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        name = self._nvml.nvmlDeviceGetName(handle)
        return DeviceInfo(
            f"gpu:{index}",
            name.decode() if isinstance(name, bytes) else str(name),
            int(memory.total) // _MIB,
            int(memory.used) // _MIB,
        )

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

    @property
    def empty(self) -> bool:
        return not self._handles


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
    gpus = NvmlGpus(pynvml, present)
    return None if gpus.empty else gpus
