"""The GetResources report: devices, per-model memory, what could still be loaded."""

from __future__ import annotations

from dataclasses import dataclass

from router.pool.pool import Pool
from router.pool.state import ModelState
from router.resources.devices import Inventory
from router.scheduler.policy import Admit, Evict


@dataclass(frozen=True, slots=True)
class DeviceReport:
    id: str
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    reserved_mib: int
    simulated: bool


@dataclass(frozen=True, slots=True)
class ModelMemoryReport:
    alias: str
    device: str
    state: ModelState
    estimate_mib: int
    measured_mib: int
    weights_mib: int
    kv_cache_mib: int
    fits: bool


@dataclass(frozen=True, slots=True)
class ResourceReport:
    cpu_mode: bool
    devices: list[DeviceReport]
    models: list[ModelMemoryReport]
    loadable: list[str]


def build_report(pool: Pool, inventory: Inventory, only: str = "") -> ResourceReport:
    reservations = pool.reservations()
    reserved: dict[str, int] = {}
    for reservation in reservations.values():
        reserved[reservation.device] = reserved.get(reservation.device, 0) + reservation.memory_mib
    devices = [
        DeviceReport(
            id=d.id,
            name=d.name,
            total_mib=d.total_mib,
            used_mib=d.used_mib if not d.simulated else d.used_mib + reserved.get(d.id, 0),
            free_mib=max(
                0, d.total_mib - d.used_mib - (reserved.get(d.id, 0) if d.simulated else 0)
            ),
            reserved_mib=reserved.get(d.id, 0),
            simulated=d.simulated,
        )
        for d in inventory.devices()
    ]
    models: list[ModelMemoryReport] = []
    loadable: list[str] = []
    for supervisor in pool.supervisors():
        plan = pool.plan_for(supervisor)
        resident = supervisor.alias in reservations
        if not resident and isinstance(plan, Admit) and supervisor.state is ModelState.STOPPED:
            loadable.append(supervisor.alias)
        if only and supervisor.alias != only:
            continue
        estimate = supervisor.estimate
        models.append(
            ModelMemoryReport(
                alias=supervisor.alias,
                device=supervisor.device
                or (plan.device if isinstance(plan, (Admit, Evict)) else ""),
                state=supervisor.state,
                estimate_mib=supervisor.memory_estimate_mib,
                measured_mib=supervisor.memory_measured_mib,
                weights_mib=estimate.weights_mib if estimate else 0,
                kv_cache_mib=estimate.kv_cache_mib if estimate else 0,
                fits=resident or isinstance(plan, (Admit, Evict)),
            )
        )
    return ResourceReport(inventory.cpu_mode, devices, models, loadable)
