"""Pure placement and eviction policy: which device a cold model goes to, whom to evict.

Input is plain data; output is a decision. No I/O, no logging, no clocks: the
pool gathers the views, calls ``plan_admission`` and carries out the plan.

Rules:
- A model fits a device when its memory estimate fits the device's free budget
  (total minus what others use minus what the router's models reserve) and the
  number of resident models stays within ``max_models``.
- Among devices where it fits, pick the best fit (least memory left over).
- Otherwise evict idle, unpinned models: the plan with the fewest evictions that
  frees both the memory (on the target device) and a model slot (anywhere);
  among equally small plans, the least recently used go first. A model with
  requests in flight, or with waiters it may still serve, is never evicted.
- When only busy or loading models stand in the way, wait for the ones the
  plan would evict once idle: they get a bounded dispatch budget (swap-thrash
  avoidance), after which they count as idle.
- When nothing can change (the model cannot fit on any allowed device even if
  it were empty, or pinned models hold the room), refuse and say why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def _lru(resident: ResidentView) -> tuple[int, float]:
    return (0, resident.last_used)


def _soonest_idle(resident: ResidentView) -> tuple[int, float]:
    """Idle models first, then busy ones (they finish a batch), then loading ones."""
    rank = 2 if resident.loading else 1 if resident.busy else 0
    return (rank, resident.last_used)


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

    now = [r for r in residents if evictable(r)]
    plan = _fewest_evictions(candidate, residents, now, possible, reserved, max_models, _lru)
    if plan is not None:
        return plan
    # Nothing idle makes room now. Busy and loading models go idle in time (the budget
    # sees to it); pinned ones never do, so waiting for them would only burn the timeout.
    unpinned = [r for r in residents if not r.pinned]
    later = _fewest_evictions(
        candidate, residents, unpinned, possible, reserved, max_models, _soonest_idle
    )
    if later is None:
        return Refuse(_pinned_reason(candidate, residents, possible, max_models))
    named = {r.alias: r for r in residents}
    return Wait(tuple(alias for alias in later.victims if not evictable(named[alias])))


def _fewest_evictions(
    candidate: CandidateView,
    residents: Sequence[ResidentView],
    movable: Sequence[ResidentView],
    devices: Sequence[DeviceView],
    reserved: dict[str, int],
    max_models: int,
    order: Callable[[ResidentView], tuple[int, float]],
) -> Evict | None:
    """The device and victims (from ``movable``) with the fewest evictions; ties go to the
    earlier device in preference order."""
    ranked = sorted(movable, key=order)
    slots_needed = len(residents) - max_models + 1
    best: Evict | None = None
    for device in devices:
        on_device = [r for r in ranked if r.device == device.id]
        memory_needed = candidate.memory_mib - (device.capacity_mib - reserved[device.id])
        chosen = _fewest_covering(on_device, memory_needed)
        if chosen is None:
            continue
        # Any model frees a slot: the first in order that are not chosen yet.
        extra = [r for r in ranked if not any(r is c for c in chosen)]
        missing = max(0, slots_needed - len(chosen))
        if missing > len(extra):
            continue
        victims = [*chosen, *extra[:missing]]
        if victims and (best is None or len(victims) < len(best.victims)):
            best = Evict(device.id, tuple(r.alias for r in ranked if any(r is v for v in victims)))
    return best


def _fewest_covering(ranked: Sequence[ResidentView], needed_mib: int) -> list[ResidentView] | None:
    """As few of ``ranked`` as free ``needed_mib``, earliest in its order; None if none do.

    The fewest is what the largest ones need; each model is then taken in order if the
    largest of those after it can still make up the rest.
    """
    if needed_mib <= 0:
        return []
    sizes = sorted((r.memory_mib for r in ranked), reverse=True)
    count = next((k for k in range(1, len(sizes) + 1) if sum(sizes[:k]) >= needed_mib), None)
    if count is None:
        return None
    chosen: list[ResidentView] = []
    freed = 0
    for index, resident in enumerate(ranked):
        left = count - len(chosen)
        if left == 0:
            break
        after = sorted((r.memory_mib for r in ranked[index + 1 :]), reverse=True)[: left - 1]
        if freed + resident.memory_mib + sum(after) >= needed_mib:
            chosen.append(resident)
            freed += resident.memory_mib
    return chosen


def _pinned_reason(
    candidate: CandidateView,
    residents: Sequence[ResidentView],
    devices: Sequence[DeviceView],
    max_models: int,
) -> str:
    pinned = [r for r in residents if r.pinned]
    if len(pinned) >= max_models:
        names = ", ".join(r.alias for r in pinned)
        return (
            f"all {max_models} model slots are held by pinned models ({names}), "
            "which are never unloaded for another model"
        )
    ids = {d.id for d in devices}
    names = ", ".join(f"{r.alias} on {r.device}" for r in pinned if r.device in ids)
    return (
        f"the model needs about {candidate.memory_mib} MiB and pinned models ({names}) "
        "hold the rest of every device it may use; they are never unloaded for another model"
    )
