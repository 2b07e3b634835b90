"""Pure placement and eviction policy: which device a cold model goes to, whom to evict.

Input is plain data; output is a decision. No I/O, no logging, no clocks: the
pool gathers the views, calls ``plan_admission`` and carries out the plan.

Rules:
- A model fits a device when its memory estimate fits the device's free budget
  (total minus what others use minus what the router's models reserve) and the
  number of resident models stays within ``max_models``.
- Among devices where it fits, pick the best fit (least memory left over).
- Otherwise evict idle, unpinned models, least recently used first, choosing the
  device that needs the fewest evictions. A model with requests in flight, or
  with waiters it may still serve, is never evicted.
- When only busy models stand in the way, wait: the blockers get a bounded
  dispatch budget (swap-thrash avoidance), after which they count as idle.
- When the model cannot fit on any allowed device even if it were empty, refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    total_mib: int
    used_by_others_mib: int  # memory used by processes that are not the router's children

    @property
    def capacity_mib(self) -> int:
        return max(0, self.total_mib - self.used_by_others_mib)


@dataclass(frozen=True, slots=True)
class ResidentView:
    alias: str
    device: str
    memory_mib: int
    busy: bool  # requests in flight, or waiters it may still serve
    pinned: bool
    loading: bool  # STARTING/LOADING: neither idle nor evictable
    last_used: float  # monotonic end of the last request; smaller = older


@dataclass(frozen=True, slots=True)
class CandidateView:
    alias: str
    memory_mib: int
    devices: tuple[str, ...]  # allowed devices, in preference order


@dataclass(frozen=True, slots=True)
class Admit:
    device: str


@dataclass(frozen=True, slots=True)
class Evict:
    device: str
    victims: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    blockers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str


Plan = Admit | Evict | Wait | Refuse


def evictable(resident: ResidentView) -> bool:
    return not (resident.busy or resident.pinned or resident.loading)


def plan_admission(
    candidate: CandidateView,
    residents: Sequence[ResidentView],
    devices: Sequence[DeviceView],
    max_models: int,
) -> Plan:
    allowed = [d for d in devices if d.id in candidate.devices]
    allowed.sort(key=lambda d: candidate.devices.index(d.id))
    possible = [d for d in allowed if d.capacity_mib >= candidate.memory_mib]
    if not possible:
        largest = max((d.capacity_mib for d in allowed), default=0)
        return Refuse(
            f"the model needs about {candidate.memory_mib} MiB but the largest allowed "
            f"device has {largest} MiB available"
        )

    reserved = {d.id: 0 for d in devices}
    for resident in residents:
        reserved[resident.device] = reserved.get(resident.device, 0) + resident.memory_mib
    count_ok = len(residents) < max_models

    fits = [d for d in possible if d.capacity_mib - reserved[d.id] >= candidate.memory_mib]
    if fits and count_ok:
        best = min(fits, key=lambda d: d.capacity_mib - reserved[d.id] - candidate.memory_mib)
        return Admit(best.id)

    # Least recently used first; evicting on the target device frees memory there,
    # evicting anywhere frees a model slot.
    lru = sorted((r for r in residents if evictable(r)), key=lambda r: r.last_used)
    best_plan: Evict | None = None
    for device in possible:
        victims: list[str] = []
        free = device.capacity_mib - reserved[device.id]
        count = len(residents)
        for resident in lru:
            if free >= candidate.memory_mib and count < max_models:
                break
            on_device = resident.device == device.id
            if not on_device and count < max_models:
                continue  # would free nothing this device needs
            victims.append(resident.alias)
            count -= 1
            if on_device:
                free += resident.memory_mib
        if free >= candidate.memory_mib and count < max_models and victims:
            if best_plan is None or len(victims) < len(best_plan.victims):
                best_plan = Evict(device.id, tuple(victims))
    if best_plan is not None:
        return best_plan

    blockers = tuple(
        r.alias
        for r in residents
        if not evictable(r) and not r.pinned and r.device in candidate.devices
    )
    return Wait(blockers)
