"""The pool: every model's supervisor, the room they share, liveness, preload, shutdown.

The pool carries out the admission plans of ``scheduler.policy``: it reserves
room for a model about to load, evicts idle models the plan names, makes a
cold model wait while busy models finish a bounded batch, and serialises loads
per device. It is the only place that sees all models at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from router.config import ModelConfig, ModelParams, Settings
from router.errors import DeadlineExceeded, ModelNotFound, Unavailable
from router.pool.command import EMBEDDED_SERVER, LaunchSpec
from router.pool.health import LivenessMonitor
from router.pool.launcher import Launcher
from router.pool.registry import ChildRegistry
from router.pool.snapshot import LoadStage, ModelKind, ModelSnapshot
from router.pool.state import ModelState
from router.pool.supervisor import ModelEvents, PoolContext, Supervisor, SupervisorSettings
from router.resources.devices import Inventory
from router.scheduler.policy import (
    Admit,
    CandidateView,
    DeviceView,
    Evict,
    Plan,
    Refuse,
    ResidentView,
    Wait,
    plan_admission,
)
from router.tasks import BackgroundTasks
from router.v1 import errors_pb2

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reservation:
    device: str
    memory_mib: int


# The largest batch an embedding model gets by default (batch_override's own ceiling).
EMBEDDING_BATCH_CAP = 4096


def _batch_sizes(params: ModelParams) -> tuple[int, int | None]:
    """(--batch-size, --ubatch-size or None for llama-server's default).

    llama-server embeds each input in one micro-batch and refuses a longer input. So an
    embedding model whose config sets neither batch gets both at its context (up to
    EMBEDDING_BATCH_CAP): any input that fits the context embeds, where llama-server's
    defaults would refuse inputs past 256-512 tokens.
    """
    if params.embedding and params.batch_override is None and params.ubatch_size is None:
        size = min(params.n_ctx, EMBEDDING_BATCH_CAP)
        return size, size
    return params.batch_override or params.n_batch, params.ubatch_size


def launch_spec(alias: str, model: ModelConfig, settings: Settings) -> LaunchSpec:
    system = settings.system
    params = model.params
    server_path = system.llama_server_path
    n_batch, ubatch_size = _batch_sizes(params)
    return LaunchSpec(
        alias=alias,
        model_path=model.resolved_path,
        server=(str(server_path),) if server_path else EMBEDDED_SERVER,
        n_ctx=params.n_ctx,
        slots=model.slots(system),
        n_gpu_layers=params.n_gpu_layers,
        n_batch=n_batch,
        ubatch_size=ubatch_size,
        threads=params.threads or system.cpu_threads,
        type_k=params.type_k,
        type_v=params.type_v,
        flash_attention=system.flash_attention,
        use_mmap=system.use_mmap,
        embedding=params.embedding,
        pooling=params.pooling,
        rope_freq_base=params.rope_freq_base,
        chat_template=params.chat_template,
        extra_args=tuple(params.extra_args),
    )


class Pool:
    def __init__(
        self,
        settings: Settings,
        publish: Callable[[ModelSnapshot], None],
        inventory: Inventory,
        events: ModelEvents,
    ) -> None:
        self._events = events
        self.settings = settings
        self._publish = publish
        self.inventory = inventory
        self._registry = ChildRegistry(settings.system.resolved_state_dir(settings.grpc))
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self._supervisors: dict[str, Supervisor] = {}
        self._reservations: dict[str, Reservation] = {}
        self._load_turns: dict[str, asyncio.Semaphore] = {}
        self._room_changed: asyncio.Future[None] | None = None
        self._pending: list[Supervisor] = []  # loads waiting for room, oldest first
        self._background = BackgroundTasks()
        self._setpriv = shutil.which("setpriv")
        self._base_env = dict(os.environ)  # what every child starts from
        self.launcher = Launcher(self._setpriv, self._spare_env())
        system = settings.system
        self.liveness = LivenessMonitor(
            self.supervisors,
            interval=system.probe_interval_sec,
            timeout=system.probe_timeout_sec,
            failures_to_replace=system.probe_failures_to_replace,
        )

    # ---- lifecycle -----------------------------------------------------------

    async def start(self, *, traced: bool = False) -> None:
        await asyncio.to_thread(self._registry.acquire)
        leftovers = await asyncio.to_thread(self._registry.reap_leftovers)
        if leftovers:
            _LOGGER.warning("stopped %d leftover children of an earlier run", len(leftovers))
        system = self.settings.system
        trace_configs = []
        if traced:  # one span per upstream HTTP call, child of the router's server span
            from opentelemetry.instrumentation.aiohttp_client import create_trace_config

            trace_configs.append(create_trace_config())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                limit_per_host=system.http_max_connections,
                # Drop idle sockets before llama-server's own keep-alive timeout (5 s)
                # closes them under us.
                keepalive_timeout=2.0,
            ),
            auto_decompress=False,
            trace_configs=trace_configs,
        )
        # Never traced (see PoolContext.probe_session); probes close their connections.
        self._probe_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True)
        )
        if self._setpriv is None:
            _LOGGER.warning("setpriv not found: children will not die with the router")
        self.launcher.replenish()
        context = PoolContext(
            session=self._session,
            probe_session=self._probe_session,
            registry=self._registry,
            admission=self,
            publish=self._publish,
            launcher=self.launcher,
            base_env=self._base_env,
            log_ring_lines=system.log_ring_lines,
            on_suspect=self.liveness.suspect,
            measure_memory=self.inventory.process_memory_mib,
            events=self._events,
        )
        device_ids = tuple(d.id for d in self.inventory.devices())
        for alias, model in self.settings.models.items():
            self._supervisors[alias] = Supervisor(
                alias, self._supervisor_settings(alias, model, device_ids), context
            )
        for supervisor in self._supervisors.values():
            supervisor.created_at = await asyncio.to_thread(
                _mtime, supervisor.settings.spec.model_path
            )
        self.spawn(self.liveness.run(self._probe_session), name="liveness")
        self.spawn(self._estimate_all(), name="estimates")

    def _spare_env(self) -> dict[str, str] | None:
        """The environment of the spare launcher, None when none is worth keeping: in CPU mode,
        for a model on the embedded server without env of its own (see router.pool.launcher)."""
        embedded = any(
            launch_spec(alias, model, self.settings).server == EMBEDDED_SERVER and not model.env
            for alias, model in self.settings.models.items()
        )
        if not (self.settings.system.spare_launcher and embedded and self.inventory.cpu_mode):
            return None
        return self._base_env  # what a child without env of its own gets

    async def _estimate_all(self) -> None:
        for supervisor in self._supervisors.values():
            await supervisor.estimate_memory()

    def _supervisor_settings(
        self, alias: str, model: ModelConfig, device_ids: tuple[str, ...]
    ) -> SupervisorSettings:
        system = self.settings.system
        allowed = device_ids
        if model.devices is not None:
            allowed = tuple(d for d in device_ids if _gpu_index(d) in model.devices) or device_ids
        return SupervisorSettings(
            spec=launch_spec(alias, model, self.settings),
            kind=ModelKind.EMBEDDING if model.is_embedding else ModelKind.CHAT,
            env=dict(model.env),
            pinned=model.pinned,
            ttl_sec=model.effective_ttl(system),
            max_queue=system.max_queue_size_per_model,
            aging_dispatches=system.aging_dispatches,
            queue_timeout_sec=system.queue_timeout_sec,
            request_timeout_sec=system.request_timeout_sec,
            wait_ready_sec=system.wait_ready_sec,
            stop_grace_sec=system.stop_grace_sec,
            drain_timeout_sec=system.drain_timeout_sec,
            load_max_retries=system.model_load_max_retries,
            failure_threshold=system.failure_threshold,
            failure_cooldown_sec=system.failure_cooldown_sec,
            stable_after_sec=system.stable_after_sec,
            allowed_devices=allowed,
            on_gpu=not self.inventory.cpu_mode,
            vram_multiplier=system.vram_multiplier,
            min_vram_mib=system.min_vram_required,
            memory_mib=model.memory_mib,
            max_tokens_cap=model.max_tokens_cap,
        )

    def start_preload(self, done: Callable[[], None]) -> None:
        """Load ``preload_models`` in the background, one after another."""
        names = self.settings.system.preload_models
        aliases = list(self._supervisors) if names == ["*"] else list(names)

        async def preload() -> None:
            try:
                for alias in aliases:
                    try:
                        await self._supervisors[alias].load(wait=True, timeout=None)
                    except Exception as error:  # a failed preload must not stop the others
                        _LOGGER.warning("preload of %s failed: %s", alias, error)
            finally:
                done()

        self.spawn(preload(), name="preload")

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        """Run ``coro`` in the background until shutdown; an error it ends with is logged."""
        self._background.spawn(coro, name)

    async def shutdown(self) -> None:
        await self._background.cancel_all()
        await asyncio.gather(
            *(sup.shutdown() for sup in self._supervisors.values()), return_exceptions=True
        )
        await self.launcher.close()
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        await asyncio.to_thread(self._registry.release)

    # ---- lookups -------------------------------------------------------------

    def get(self, alias: str) -> Supervisor:
        supervisor = self._supervisors.get(alias)
        if supervisor is None:
            raise ModelNotFound(alias)
        return supervisor

    def supervisors(self) -> list[Supervisor]:
        return list(self._supervisors.values())

    def has(self, alias: str) -> bool:
        return alias in self._supervisors

    def snapshots(self) -> tuple[ModelSnapshot, ...]:
        return tuple(sup.snapshot() for sup in self._supervisors.values())

    # ---- admission (the supervisor's Admission protocol) -----------------------

    @contextlib.asynccontextmanager
    async def admit(self, supervisor: Supervisor) -> AsyncIterator[str]:
        """Reserve room for ``supervisor``, then hold its device's load turn.

        Loads waiting for room are served in arrival order: a load may take room
        only when no older waiting load could take it now. Without that, a model
        just evicted for another would win its own room back at once (livelock).
        """
        alias = supervisor.alias
        deadline = time.monotonic() + self.settings.system.queue_timeout_sec
        limit = self.settings.system.swap_batch_limit
        held: list[Supervisor] = []
        self._pending.append(supervisor)
        try:
            while alias not in self._reservations:
                plan = self.plan_for(supervisor)
                if isinstance(plan, Refuse):
                    raise Unavailable(
                        f"model '{alias}' cannot be loaded: {plan.reason}",
                        reason=errors_pb2.ERROR_REASON_NO_CAPACITY,
                        retry_after=60.0,
                    )
                if isinstance(plan, Admit) and not self._older_can_act(supervisor):
                    memory = self._candidate(supervisor).memory_mib
                    self._reservations[alias] = Reservation(plan.device, memory)
                    continue
                if isinstance(plan, Evict) and not self._older_can_act(supervisor):
                    supervisor.set_stage(LoadStage.EVICTING)
                    await asyncio.gather(*(self._supervisors[v].evict() for v in plan.victims))
                    supervisor.set_stage(LoadStage.WAITING_FOR_CAPACITY)
                    continue
                if isinstance(plan, Wait):
                    for blocker in plan.blockers:
                        other = self._supervisors[blocker]
                        if other.queue.budget is None:
                            other.queue.set_budget(limit)
                            held.append(other)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"no room to load model '{alias}' in time",
                        reason=errors_pb2.ERROR_REASON_QUEUE_TIMEOUT,
                    )
                await asyncio.wait({self._room_future()}, timeout=remaining)
        finally:
            self._pending.remove(supervisor)
            for other in held:
                other.queue.set_budget(None)
            self.notify()  # younger waiting loads may go now
        device = self._reservations[alias].device
        turn = self._load_turns.setdefault(
            device, asyncio.Semaphore(self.settings.system.max_loads_per_device)
        )
        try:
            async with turn:
                yield device
        except BaseException:
            self.release(alias)
            raise

    def release(self, alias: str) -> None:
        if self._reservations.pop(alias, None) is not None:
            self.notify()

    def notify(self) -> None:
        """Room may have changed (a model stopped or went idle): wake waiting loads."""
        future, self._room_changed = self._room_changed, None
        if future is not None and not future.done():
            future.set_result(None)

    def _room_future(self) -> asyncio.Future[None]:
        if self._room_changed is None:
            self._room_changed = asyncio.get_running_loop().create_future()
        return self._room_changed

    def reservations(self) -> dict[str, Reservation]:
        return dict(self._reservations)

    def plan_for(self, supervisor: Supervisor) -> Plan:
        """What admitting ``supervisor`` now would take (read-only, for reports)."""
        return plan_admission(
            self._candidate(supervisor),
            self._residents(exclude=supervisor.alias),
            self._devices(),
            self.settings.system.max_concurrent_models,
        )

    def _older_can_act(self, supervisor: Supervisor) -> bool:
        """Whether a load that has waited longer than ``supervisor``'s could admit or evict now."""
        for older in self._pending:
            if older is supervisor:
                return False
            if isinstance(self.plan_for(older), (Admit, Evict)):
                return True
        return False

    def _candidate(self, supervisor: Supervisor) -> CandidateView:
        memory = max(supervisor.memory_estimate_mib, supervisor.memory_measured_mib)
        return CandidateView(supervisor.alias, memory, supervisor.settings.allowed_devices)

    def _devices(self) -> list[DeviceView]:
        """Device budgets for the policy: what is left once non-router usage is counted.

        A real device's "used" includes the router's own children, which the policy counts
        through their reservations: what each of them holds is taken out of "used" first.
        """
        views = []
        held: dict[str, int] | None = None
        for device in self.inventory.devices():
            if device.simulated or self.inventory.cpu_mode:
                others = device.used_mib if device.simulated else 0
            else:
                held = self._held_per_device() if held is None else held
                others = max(0, device.used_mib - held.get(device.id, 0))
            views.append(DeviceView(device.id, device.total_mib, others))
        return views

    def _held_per_device(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for alias, reservation in self._reservations.items():
            sup = self._supervisors[alias]
            child = sup.child
            live = self.inventory.process_memory_mib(child.pid) if child and child.running else None
            # Only a started child can hold memory: a model with room reserved but still
            # waiting for its device's load turn (STOPPED, or FAILED on a retry) holds none.
            loaded = sup.state in (ModelState.READY, ModelState.DRAINING, ModelState.STOPPING)
            mib = held_mib(reservation.memory_mib, sup.memory_measured_mib, live, loaded=loaded)
            held[reservation.device] = held.get(reservation.device, 0) + mib
        return held

    def _residents(self, exclude: str) -> list[ResidentView]:
        residents: list[ResidentView] = []
        for alias, reservation in self._reservations.items():
            if alias == exclude:
                continue
            sup = self._supervisors[alias]
            residents.append(
                ResidentView(
                    alias=alias,
                    device=reservation.device,
                    memory_mib=max(sup.memory_measured_mib, reservation.memory_mib),
                    busy=sup.busy,
                    pinned=sup.settings.pinned,
                    loading=sup.state is not ModelState.READY,
                    last_used=sup.last_used,
                )
            )
        return residents


def held_mib(reservation_mib: int, measured_mib: int, live_mib: int | None, *, loaded: bool) -> int:
    """How much of a real device's "used" memory one of the router's models accounts for.

    NVML's per-process figure (``live_mib``) says exactly. Without one (NVML cannot see the
    child's PID, as in many containers), a loaded model is taken to hold its reservation,
    or what it measured if more. A loading one (or one still waiting for its load turn) is
    taken to hold only what it measured (nothing yet): while it loads its memory may count
    twice, which at worst makes another load wait for it to finish; taking its whole
    reservation off before it is allocated would let another model into memory that is about
    to be taken (an OOM on the GPU).
    """
    if live_mib is not None:
        return live_mib
    return max(measured_mib, reservation_mib) if loaded else measured_mib


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _gpu_index(device_id: str) -> int | None:
    prefix, _, index = device_id.partition(":")
    return int(index) if prefix == "gpu" and index.isdigit() else None
