"""One supervisor per configured model: the only code that changes its child or state.

Requests enter through ``enter()``, which returns a ``Ticket``: the ticket waits
for a slot (loading the model on demand, with one shared load task however many
callers arrive) and then holds the slot as a ``Lease``. Every state change goes
through ``_transition``, which checks the table in ``state.py`` and publishes a
snapshot. Nothing here holds a lock while another model loads, and status reads
(``snapshot``) never wait for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import aiohttp
import tenacity

from router.errors import (
    DeadlineExceeded,
    RouterError,
    Unavailable,
)
from router.pool.command import LaunchSpec, build_command
from router.pool.failures import (
    LOAD_TIMED_OUT,
    MODEL_FILE_MISSING,
    MODEL_UNREADABLE,
    Failure,
    FailureKind,
    classify_exit,
)
from router.pool.launcher import Launcher
from router.pool.process import ChildExited, ChildProcess, LogRing, ReadyTimeout, free_port
from router.pool.registry import ChildRegistry
from router.pool.snapshot import LoadStage, ModelKind, ModelSnapshot
from router.pool.state import LIVE_STATES, ModelState, check_transition
from router.pool.ticket import Lease, Ticket, as_router_error
from router.pool.upstream import Upstream
from router.resources.estimate import MemoryEstimate, estimate_memory, read_gguf
from router.scheduler.queue import Outcome, Priority, SlotQueue
from router.tasks import BackgroundTasks, detached_task, finish_before_cancel
from router.v1 import errors_pb2

_LOGGER = logging.getLogger(__name__)
S = ModelState
# After a SIGKILL a process normally is reaped at once; one stuck in the kernel (a GPU
# driver call) may not be. A replacement waits this long (twice) before going on without it.
KILL_WAIT_SEC = 1.0


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    """The per-model knobs a supervisor needs, resolved from configuration."""

    spec: LaunchSpec
    kind: ModelKind
    env: Mapping[str, str]
    pinned: bool
    ttl_sec: float | None
    max_queue: int
    aging_dispatches: int
    queue_timeout_sec: float
    request_timeout_sec: float
    wait_ready_sec: float
    stop_grace_sec: float
    drain_timeout_sec: float
    load_max_retries: int
    failure_threshold: int
    failure_cooldown_sec: float
    # A child that stays up this long has proven itself: its model's failure count starts
    # over. A crash sooner continues the count, so a child that crashes soon after each start
    # (on its first request, say) backs off further each time and opens the circuit.
    stable_after_sec: float
    allowed_devices: tuple[str, ...]
    on_gpu: bool
    vram_multiplier: float
    min_vram_mib: int
    memory_mib: int | None = None  # declared in config: replaces the estimate
    max_tokens_cap: int | None = None


class Admission(Protocol):
    """What a supervisor needs from the pool to get room on a device."""

    def admit(self, supervisor: Supervisor) -> AbstractAsyncContextManager[str]: ...

    def release(self, alias: str) -> None: ...

    def notify(self) -> None: ...


class ModelEvents(Protocol):
    """Lifecycle events of a model, for metrics (RouterMetrics implements this)."""

    def on_transition(self, alias: str, old: ModelState, new: ModelState) -> None: ...

    def on_loaded(self, alias: str, seconds: float, restart: bool) -> None: ...

    def on_evicted(self, alias: str) -> None: ...

    def on_idle_unload(self, alias: str) -> None: ...

    def on_crash(self, alias: str) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolContext:
    """Shared resources every supervisor uses."""

    session: aiohttp.ClientSession
    # /health probes go through their own, uninstrumented session: traced, every request
    # that loads a model would carry a span per readiness poll (most of them errors).
    probe_session: aiohttp.ClientSession
    registry: ChildRegistry
    admission: Admission
    publish: Callable[[ModelSnapshot], None]
    launcher: Launcher
    log_ring_lines: int
    on_suspect: Callable[[Supervisor], None]
    measure_memory: Callable[[int], int | None]
    events: ModelEvents
    base_env: Mapping[str, str]  # the environment every child starts from


class LoadError(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.summary)
        self.failure = failure


class Supervisor:
    def __init__(self, alias: str, settings: SupervisorSettings, context: PoolContext) -> None:
        self.alias = alias
        self.settings = settings
        self._ctx = context
        self.state = S.STOPPED
        self.load_stage = LoadStage.NONE
        self._state_since = time.time()
        self.queue = SlotQueue(settings.max_queue, settings.aging_dispatches)
        self.log = LogRing(context.log_ring_lines)
        self._child: ChildProcess | None = None
        self._upstream: Upstream | None = None
        self._key_file: str | None = None
        self._leases: set[Lease] = set()
        self._load_task: asyncio.Task[None] | None = None
        self._explicit_load = False
        self._half_open = False
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stable_timer: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._drain_until = 0.0  # monotonic time when a running stop stops draining
        self._tasks = BackgroundTasks()
        self.device = ""
        self.created_at = 0.0  # the model file's mtime, set by the pool at start
        self.estimate: MemoryEstimate | None = None
        self.memory_estimate_mib = 0
        self.memory_measured_mib = 0
        self.consecutive_failures = 0
        self.restarts = 0
        self._starts = 0
        self.last_error = ""
        self.retry_at = 0.0
        self.last_used = time.monotonic()
        self._last_used_wall = 0.0
        self._load_seconds = 0.0
        self._shutting_down = False

    # ---- views ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.queue.running

    @property
    def busy(self) -> bool:
        """In flight, or waiters this model may still serve (see policy)."""
        queue = self.queue
        return queue.running > 0 or (
            queue.waiting > 0 and (queue.budget is None or queue.budget > 0)
        )

    @property
    def ready(self) -> bool:
        return self.state is S.READY

    @property
    def child(self) -> ChildProcess | None:
        return self._child

    @property
    def upstream(self) -> Upstream | None:
        return self._upstream if self.state is S.READY else None

    async def settle_child(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a child that may be dying to be reaped."""
        child = self._child
        if child is not None and child.running:
            await asyncio.wait({child.exited}, timeout=timeout)

    def suspect(self) -> None:
        """A request saw the child go silent: have its liveness checked now."""
        self._ctx.on_suspect(self)

    def snapshot(self) -> ModelSnapshot:
        child = self._child
        ttl = self.settings.ttl_sec
        return ModelSnapshot(
            alias=self.alias,
            state=self.state,
            kind=self.settings.kind,
            port=child.port if child and child.running else 0,
            pid=child.pid if child and child.running else 0,
            slots=self.settings.spec.slots,
            in_flight=self.queue.running,
            queued=self.queue.waiting,
            n_ctx=self.settings.spec.n_ctx,
            pinned=self.settings.pinned,
            last_error=self.last_error,
            state_since=self._state_since,
            last_used_at=self._last_used_wall,
            retry_at=self.retry_at if self.state is S.FAILED else 0.0,
            consecutive_failures=self.consecutive_failures,
            restarts=self.restarts,
            device=self.device,
            memory_estimate_mib=self.memory_estimate_mib,
            memory_measured_mib=self.memory_measured_mib,
            load_seconds=self._load_seconds,
            ttl_sec=ttl or 0.0,
            load_stage=self.load_stage,
            created_at=self.created_at,
        )

    def changed(self) -> asyncio.Future[None]:
        """A future, shared by every caller, that completes at the next change."""
        return self._changed

    def circuit_error(self) -> Unavailable:
        retry_after = max(1.0, self.retry_at - time.time())
        return Unavailable(
            f"model '{self.alias}' is failing ({self.last_error}); retry later",
            reason=errors_pb2.ERROR_REASON_CIRCUIT_OPEN,
            retry_after=retry_after,
        )

    def tail_log(self, lines: int) -> list[str]:
        return self.log.tail(lines)

    # ---- state ---------------------------------------------------------------

    def _transition(self, target: ModelState) -> None:
        check_transition(self.state, target)
        _LOGGER.info("%s: %s -> %s", self.alias, self.state.value, target.value)
        self._ctx.events.on_transition(self.alias, self.state, target)
        self.state = target
        self._state_since = time.time()
        if target is not S.STARTING and target is not S.LOADING:
            self.load_stage = LoadStage.NONE
        self.queue.set_capacity(self.settings.spec.slots if target is S.READY else 0)
        self._announce()
        if target is S.READY and not self.busy:
            # Loading, this model could not be evicted; ready with nobody waiting (its callers
            # left during the load), it can: a load waiting for room must hear of it now.
            self._ctx.admission.notify()

    def set_stage(self, stage: LoadStage) -> None:
        if stage is not self.load_stage:
            self.load_stage = stage
            self._announce()

    def _announce(self) -> None:
        old, self._changed = self._changed, asyncio.get_running_loop().create_future()
        old.set_result(None)
        self._ctx.publish(self.snapshot())

    def _background(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        self._tasks.spawn(coro, f"{what}:{self.alias}")

    # ---- requests ------------------------------------------------------------

    def enter(self, priority: Priority) -> Ticket:
        """Join this model's queue (QueueFull when at its bound)."""
        if self._shutting_down:
            raise Unavailable(
                "the router is shutting down", reason=errors_pb2.ERROR_REASON_SHUTTING_DOWN
            )
        if self.state is S.FAILED and time.time() < self.retry_at:
            raise self.circuit_error()
        waiter = self.queue.join(priority)
        self._cancel_idle_timer()
        ticket = Ticket(self, waiter)
        self.ensure_loading()
        return ticket

    def open_lease(self) -> Lease:
        """A lease for a granted waiter; the model may have gone since the grant."""
        if self._upstream is None or self.state is not S.READY:
            if self.state is S.DRAINING:  # an unload (or eviction) began after the grant
                raise _unloaded(self.alias)
            raise Unavailable(
                f"model '{self.alias}' stopped before the request could start",
                reason=errors_pb2.ERROR_REASON_MODEL_CRASHED,
                retry_after=1.0,
            )
        lease = Lease(self, self._upstream)
        self._leases.add(lease)
        return lease

    def close_lease(self, lease: Lease) -> None:
        self._leases.discard(lease)
        self.last_used = time.monotonic()
        self._last_used_wall = time.time()
        self.release_slot()

    def release_slot(self, outcome: Outcome = "processed") -> None:
        """Give back a granted slot: its request ended, or never started (``outcome``)."""
        self.queue.release(outcome)
        if not self.busy:
            self._ctx.admission.notify()
            self._arm_idle_timer()

    def on_waiter_left(self) -> None:
        """Cancel a load nobody waits for any more, if it has not spawned yet."""
        task = self._load_task
        if (
            task is not None
            and not task.done()
            and not self._explicit_load
            and self.queue.waiting == 0
            and self.load_stage is LoadStage.WAITING_FOR_CAPACITY
        ):
            task.cancel()
        if not self.busy:
            self._ctx.admission.notify()

    def ensure_loading(self) -> asyncio.Task[None] | None:
        """Start the one shared load task when the model is down; return the current one."""
        if self._load_task is not None:
            return self._load_task
        if self.state is S.STOPPED or (self.state is S.FAILED and time.time() >= self.retry_at):
            if self.queue.waiting == 0 and not self._explicit_load:
                return None
            self._half_open = self.state is S.FAILED
            self._load_task = detached_task(self._load(), f"load:{self.alias}")
            self._load_task.add_done_callback(self._load_finished)
        return self._load_task

    def _load_finished(self, task: asyncio.Task[None]) -> None:
        self._load_task = None
        self._explicit_load = False
        if not task.cancelled():
            task.exception()  # waiters read it; retrieve it so asyncio does not warn
        self._announce()

    async def load(self, wait: bool, timeout: float | None) -> None:
        """Explicit LoadModel: start a load if needed and optionally wait for READY."""
        if self.state is S.FAILED and time.time() < self.retry_at:
            raise self.circuit_error()
        if self.state is S.READY:
            return
        self._explicit_load = True
        task = self.ensure_loading()
        if not wait:
            return
        deadline = time.monotonic() + (timeout or self.settings.wait_ready_sec)
        while not self.ready:
            task = self.ensure_loading()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"model '{self.alias}' is not ready yet",
                    reason=errors_pb2.ERROR_REASON_LOAD_TIMEOUT,
                )
            waits: set[asyncio.Future[Any]] = {self.changed()}
            if task is not None:
                waits.add(task)
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if task is not None and task.done():
                if task.cancelled():  # only an unload (or shutdown) cancels an explicit load
                    raise _unloaded(self.alias)
                if task.exception():
                    raise as_router_error(task.exception())
            if self.state is S.FAILED:
                raise self.circuit_error()

    # ---- loading -------------------------------------------------------------

    async def _load(self) -> None:
        if self.state is S.STOPPED and self.consecutive_failures > 0:
            # A restart after a crash: back off so a crash loop does not spin.
            await asyncio.sleep(restart_delay(self.consecutive_failures))
        attempts = 1 if self._half_open else 1 + self.settings.load_max_retries
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=0.25, max=10),
            retry=tenacity.retry_if_exception(
                lambda e: (
                    isinstance(e, LoadError)
                    and e.failure.kind is not FailureKind.PERMANENT
                    and self.state is not S.FAILED
                )
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._load_once()
        except LoadError as error:
            raise self._load_failed(error.failure) from None

    async def _load_once(self) -> None:
        self.set_stage(LoadStage.WAITING_FOR_CAPACITY)
        try:
            if self.estimate is None:
                await self._estimate()
            async with self._ctx.admission.admit(self) as device:
                self.device = device
                await self._spawn_and_wait()
        except LoadError as error:
            self._record_failure(error.failure)
            raise
        except RouterError as error:  # no room (refused or timed out): not the model's fault
            self.last_error = error.message
            self.set_stage(LoadStage.NONE)
            raise
        except BaseException:
            self.set_stage(LoadStage.NONE)
            raise

    async def estimate_memory(self) -> None:
        """Estimate at start for reports; a bad file is reported when the model loads."""
        if self.estimate is None:
            with contextlib.suppress(LoadError):
                await self._estimate()

    async def _estimate(self) -> None:
        """Estimate device memory from the GGUF header (off the event loop)."""
        spec = self.settings.spec
        exists = await asyncio.to_thread(spec.model_path.is_file)
        if not exists:
            raise LoadError(MODEL_FILE_MISSING)
        try:
            facts = await asyncio.to_thread(read_gguf, spec.model_path)
        except Exception as error:  # gguf raises ValueError, OSError, struct.error...
            _LOGGER.warning("%s: cannot read the GGUF header: %s", self.alias, error)
            raise LoadError(MODEL_UNREADABLE) from None
        if 0 < facts.context_length < spec.n_ctx:
            # llama-server caps each slot there (n_ctx_slot), so a request stops at that many
            # tokens (prompt + output) with finish_reason "length", whatever n_ctx promises.
            _LOGGER.warning(
                "%s: n_ctx %d is more than the model's training context, %d: llama-server "
                "gives each request at most %d tokens",
                self.alias,
                spec.n_ctx,
                facts.context_length,
                facts.context_length,
            )
        self.estimate = estimate_memory(
            facts,
            n_ctx=spec.n_ctx,
            n_gpu_layers=spec.n_gpu_layers,
            type_k=spec.type_k,
            type_v=spec.type_v,
            ubatch=spec.micro_batch,
            slots=spec.slots,
            on_gpu=self.settings.on_gpu,
        )
        if self.settings.memory_mib is not None:
            self.memory_estimate_mib = self.settings.memory_mib
            return
        total = int(self.estimate.total_mib * self.settings.vram_multiplier)
        if self.settings.on_gpu:
            total = max(total, self.settings.min_vram_mib)
        self.memory_estimate_mib = total

    async def _spawn_and_wait(self) -> None:
        spec = self.settings.spec
        exists = await asyncio.to_thread(spec.model_path.is_file)
        if not exists:
            raise LoadError(MODEL_FILE_MISSING)
        for _ in range(3):  # port races are retried at once, without counting as failures
            port = free_port()
            api_key, key_file = await asyncio.to_thread(self._ctx.registry.new_api_key, self.alias)
            self._key_file = str(key_file)
            command = build_command(spec, port=port, api_key_file=key_file)
            self._transition(S.STARTING)
            self.set_stage(LoadStage.SPAWNING)
            started = time.monotonic()
            env = {**self._ctx.base_env, **device_env(self.device), **self.settings.env}
            # Everything from the spawn on is inside the try: a cancellation (a forced unload)
            # at any await must stop the child and leave STARTING, or the model stays STARTING
            # for good with its room released (and its child running, if it had one).
            launcher = self._ctx.launcher
            try:
                child = await launcher.launch(
                    command, port=port, env=env, log=self.log, name=self.alias
                )
                self._child = child
                await asyncio.to_thread(self._ctx.registry.record, self.alias, child.pid)
                await child.wait_ready(
                    self._ctx.probe_session, self.settings.wait_ready_sec, self._on_loading
                )
            # Each cleanup runs to its end even if a forced unload cancels the load meanwhile
            # (e.g. during the stop's grace period): the unload, waiting for the load to end,
            # then finds the model STOPPED, its room released and its child gone.
            except ChildExited as exited:
                failure = classify_exit(exited.returncode, self.log.tail(40))
                await finish_before_cancel(self._discard_child())
                if failure.kind is FailureKind.PORT_CONFLICT:
                    continue
                raise LoadError(failure) from None
            except ReadyTimeout:
                await finish_before_cancel(self._discard_child(stop=True))
                raise LoadError(LOAD_TIMED_OUT) from None
            except BaseException:
                await finish_before_cancel(self._discard_child(stop=True))
                raise
            finally:
                launcher.replenish()  # the next spare starts once this load is over
            self._upstream = Upstream(
                self._ctx.session, port, api_key, self.settings.request_timeout_sec
            )
            self._load_seconds = time.monotonic() - started
            if self._starts:
                self.restarts += 1
            self._ctx.events.on_loaded(self.alias, self._load_seconds, restart=self._starts > 0)
            self._starts += 1
            # The circuit is closed, but the failure count stays until the child has stayed
            # up for a while: a crash soon after READY is the same failure happening again.
            self.retry_at = 0.0
            self._stable_timer = asyncio.get_running_loop().call_later(
                self.settings.stable_after_sec, self._proven_stable, child
            )
            # Registered before READY but run after it (call_soon), so an exit in
            # between is still seen as a crash.
            child.exited.add_done_callback(partial(self._on_exit_future, child))
            self._transition(S.READY)
            self._arm_idle_timer()
            self._background(self._measure(child), "measure")
            return
        raise LoadError(Failure(FailureKind.RETRYABLE, "no free port could be bound"))

    async def _measure(self, child: ChildProcess) -> None:
        """Keep the child's measured memory; the next placement uses it."""
        measured = await asyncio.to_thread(self._ctx.measure_memory, child.pid)
        if measured and self._child is child:
            self.memory_measured_mib = measured
            self._announce()

    def _proven_stable(self, child: ChildProcess) -> None:
        self._stable_timer = None
        if self._child is child and self.state is S.READY and self.consecutive_failures:
            self.consecutive_failures = 0
            self.last_error = ""
            self._announce()

    def _on_loading(self) -> None:
        if self.state is S.STARTING:
            self._transition(S.LOADING)
        self.set_stage(LoadStage.LOADING_WEIGHTS)

    async def _discard_child(self, *, stop: bool = False) -> None:
        """Stop (if asked) and forget the child after a failed start; state → STOPPED."""
        child = self._child
        if child is not None:
            if stop:
                await child.stop(self.settings.stop_grace_sec)
            await self._forget_child(child)
        if self.state in (S.STARTING, S.LOADING):
            self._transition(S.STOPPED)
        self._ctx.admission.release(self.alias)

    async def _forget_child(self, child: ChildProcess) -> None:
        if self._child is child:
            self._child = None
            self._upstream = None
            self._cancel_stable_timer()
        if child.running:
            # Not reaped yet (see replace_hung): its record stays, so a restarted router
            # still stops it, until it is gone.
            child.exited.add_done_callback(
                lambda _: self._background(
                    asyncio.to_thread(self._ctx.registry.forget, child.pid), "forget-record"
                )
            )
        else:
            await asyncio.to_thread(self._ctx.registry.forget, child.pid)
        if self._key_file is not None:
            key_file, self._key_file = self._key_file, None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.unlink, key_file)

    def _record_failure(self, failure: Failure) -> None:
        self.consecutive_failures += 1
        self.last_error = failure.summary
        _LOGGER.warning(
            "%s: load failed (%s, %d in a row)",
            self.alias,
            failure.summary,
            self.consecutive_failures,
        )
        if (
            failure.kind is FailureKind.PERMANENT
            or self._half_open
            or self.consecutive_failures >= self.settings.failure_threshold
        ):
            self._open_circuit(self._load_failed(failure))
        else:
            self._announce()

    def _load_failed(self, failure: Failure) -> Unavailable:
        return Unavailable(
            f"model '{self.alias}' could not be loaded: {failure.summary}",
            reason=errors_pb2.ERROR_REASON_LOAD_FAILED,
            retry_after=max(1.0, self.retry_at - time.time()) if self.retry_at else 5.0,
        )

    def _open_circuit(self, error: Unavailable | None = None) -> None:
        """FAILED until the cool-down ends; waiters fail with ``error`` (or the circuit error)."""
        self.retry_at = time.time() + self.settings.failure_cooldown_sec
        if self.state is S.FAILED:
            # A half-open attempt that failed before it left FAILED (the model file is
            # missing or unreadable): the circuit stays open with a new cool-down.
            self._announce()
        else:
            self._transition(S.FAILED)
        if error is not None:
            error.retry_after = self.settings.failure_cooldown_sec
        self.queue.fail_waiting(error or self.circuit_error())

    # ---- crashes and stops ---------------------------------------------------

    def _on_exit_future(self, child: ChildProcess, _: asyncio.Future[int]) -> None:
        self._on_exit(child)

    def _on_exit(self, child: ChildProcess) -> None:
        """The child exited. Expected during a stop; otherwise it crashed."""
        if self._child is not child or self.state not in (S.READY, S.DRAINING):
            return
        failure = classify_exit(child.exited.result(), self.log.tail(40))
        _LOGGER.error("%s: child crashed: %s", self.alias, failure.summary)
        self._abort_leases(f"model '{self.alias}' stopped unexpectedly: {failure.summary}")
        self._transition(S.STOPPED)
        self._background(self._forget_child(child), "forget-child")
        self._after_crash(failure.summary)

    def _abort_leases(self, message: str) -> None:
        crash = Unavailable(message, reason=errors_pb2.ERROR_REASON_MODEL_CRASHED, retry_after=1.0)
        for lease in list(self._leases):
            lease.abort(crash)

    def _after_crash(self, summary: str) -> None:
        """Bookkeeping once a crashed child is gone (state STOPPED): count the failure, then
        open the circuit or restart (with backoff) for the requests still waiting.

        The count goes on from the failures before this child's start unless the child
        stayed up for ``stable_after_sec`` (see ``_proven_stable``), so a child that keeps
        crashing soon after READY backs off further each time and opens the circuit."""
        self._ctx.events.on_crash(self.alias)
        self._ctx.admission.release(self.alias)
        self._cancel_idle_timer()
        self.consecutive_failures += 1
        self.last_error = summary
        if self.consecutive_failures >= self.settings.failure_threshold:
            self._open_circuit()
        elif self.queue.waiting:
            self.ensure_loading()

    async def unload(self, *, force: bool, drain_timeout: float | None) -> bool:
        """Stop the model (drain first unless ``force``). Returns whether a child ran.

        Waiters fail at once: an admin unload that they would undo by reloading
        the model right after would not be an unload.
        """
        error = _unloaded(self.alias)
        self.queue.fail_waiting(error)
        task = self._load_task
        cancelled_load = task is not None and not task.done()
        if task is not None and cancelled_load:
            task.cancel()
            # Wait for it to unwind without taking on its outcome; unlike a suppress() around
            # `await task`, this lets a cancellation of this caller through.
            await asyncio.wait({task})
        if self.state not in (S.READY, S.DRAINING):
            if self._stopping is not None:
                await asyncio.shield(self._stopping)
                return True
            return cancelled_load
        await self._stop(
            drain=0.0 if force else (drain_timeout or self.settings.drain_timeout_sec),
            error=error,
        )
        return True

    async def evict(self, *, idle: bool = False) -> bool:
        """Stop for room (or after the idle TTL) if still idle: a request may have arrived.

        Nothing is awaited between the idle check and the step out of READY (in ``_stop``):
        a request arriving after the decision finds no free slot and waits for a reload,
        instead of being granted a slot on a child that is about to be stopped under it.
        """
        if self.state is not S.READY or self.busy or self.settings.pinned:
            return False
        if idle:
            _LOGGER.info("%s: idle for %g s, unloading", self.alias, self.settings.ttl_sec or 0)
            self._ctx.events.on_idle_unload(self.alias)
        else:
            _LOGGER.info("%s: evicting to make room", self.alias)
            self._ctx.events.on_evicted(self.alias)
        await self._stop(drain=0.0, error=None)
        return True

    async def _stop(self, *, drain: float, error: RouterError | None) -> None:
        drain_until = time.monotonic() + drain
        if self._stopping is None:
            # Leave READY now (capacity 0), not when the task first runs: in between, a
            # request would be granted a slot the stop then takes away.
            self._cancel_idle_timer()
            if self.state is S.READY:
                self._transition(S.DRAINING)
            self._drain_until = drain_until
            self._stopping = stopping = detached_task(self._do_stop(error), f"stop:{self.alias}")
            # Cleared by the stop itself, not by a caller that may be cancelled before it ends.
            stopping.add_done_callback(self._stop_finished)
        else:
            # A stop already running drains no longer than this caller allows: a forced unload
            # during a drain stops at once instead of waiting for the drain's timeout.
            self._drain_until = min(self._drain_until, drain_until)
        await asyncio.shield(self._stopping)

    def _stop_finished(self, task: asyncio.Task[None]) -> None:
        if self._stopping is task:
            self._stopping = None

    async def _do_stop(self, error: RouterError | None) -> None:
        self._cancel_idle_timer()
        if self.state is S.READY:
            self._transition(S.DRAINING)
        while (
            not self._crashed_while_draining()
            and self.queue.running > 0
            and (left := self._drain_until - time.monotonic()) > 0
        ):
            await asyncio.wait({self.changed()}, timeout=min(0.05, left))
        if self._crashed_while_draining():
            return
        for lease in list(self._leases):
            lease.abort(error or _unloaded(self.alias))
        child = self._child
        self._transition(S.STOPPING)
        if child is not None:
            await child.stop(self.settings.stop_grace_sec)
            await self._forget_child(child)
        if self.state is S.STOPPING:
            self._transition(S.STOPPED)
        self._ctx.admission.release(self.alias)

    def _crashed_while_draining(self) -> bool:
        # Only a crash takes a model out of DRAINING while its stop runs: the crash path has
        # then aborted its requests, forgotten its child and released its room, and a reload
        # since (for requests that came meanwhile) has a child and room that are not the
        # stop's to undo.
        return self.state is not S.DRAINING

    async def replace_hung(self) -> None:
        """The child stopped answering: kill it (SIGKILL works on a stopped process)."""
        child = self._child
        if child is None or self.state is not S.READY:
            return
        _LOGGER.error("%s: child pid %d stopped answering; replacing it", self.alias, child.pid)
        self._abort_leases(f"model '{self.alias}' stopped responding")
        # Out of READY before the kill: no new request may reach the hung child while it dies
        # (and its exit, now expected, is not counted twice by _on_exit).
        self._transition(S.STOPPING)
        wait = max(KILL_WAIT_SEC, self.settings.stop_grace_sec)
        for _ in range(2):
            child.kill()
            done, _ = await asyncio.wait({child.exited}, timeout=wait)
            if done:
                break
        else:
            # Waiting longer would leave the model STOPPING, unusable, for as long as the
            # kernel holds the process; its record stays in the registry (_forget_child).
            _LOGGER.error(
                "%s: pid %d not reaped %g s after SIGKILL; going on without it",
                self.alias,
                child.pid,
                2 * wait,
            )
        await self._forget_child(child)
        self._transition(S.STOPPED)
        self._after_crash("the model stopped responding")

    def reset(self) -> tuple[bool, str]:
        """Close the circuit and clear failures. Returns (was_failed, previous_error)."""
        previous = self.last_error
        was_failed = self.state is S.FAILED or self.consecutive_failures > 0
        self.consecutive_failures = 0
        self.last_error = ""
        self.retry_at = 0.0
        if self.state is S.FAILED:
            self._transition(S.STOPPED)
        elif was_failed:
            self._announce()
        return was_failed, previous

    async def shutdown(self) -> None:
        self._shutting_down = True
        self.queue.fail_waiting(
            Unavailable("the router is shutting down", reason=errors_pb2.ERROR_REASON_SHUTTING_DOWN)
        )
        task = self._load_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        if self.state in LIVE_STATES:
            await self._stop(
                drain=0.0,
                error=Unavailable(
                    "the router is shutting down", reason=errors_pb2.ERROR_REASON_SHUTTING_DOWN
                ),
            )

    # ---- idle TTL ------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        ttl = self.settings.ttl_sec
        if ttl and not self.settings.pinned and self.state is S.READY and not self.busy:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(ttl, self._idle_expired)

    def _cancel_stable_timer(self) -> None:
        if self._stable_timer is not None:
            self._stable_timer.cancel()
            self._stable_timer = None

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.state is S.READY and not self.busy:
            self._background(self.evict(idle=True), "idle-unload")


def device_env(device: str) -> dict[str, str]:
    """Pin a child to its GPU: it sees only that device (as CUDA device 0).

    The index is NVML's, which numbers GPUs by PCI bus; CUDA numbers them fastest first
    unless told otherwise, so on a host with mixed GPUs the child would land on another GPU
    than the one its memory is accounted on.
    """
    kind, _, index = device.partition(":")
    if kind != "gpu":
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": index}


def _unloaded(alias: str) -> Unavailable:
    return Unavailable(
        f"model '{alias}' was unloaded",
        reason=errors_pb2.ERROR_REASON_MODEL_UNLOADED,
        retry_after=1.0,
    )


def restart_delay(failures: int) -> float:
    """Backoff before restarting after ``failures`` consecutive failures (tenacity's curve)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = failures
    return float(tenacity.wait_exponential(multiplier=0.25, max=10)(state))
