"""ModelControlService: proto in, pool/hub call, proto out. No business logic here."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import replace
from typing import Any

import grpc

from router.auth import current_principal, visible
from router.errors import InvalidRequest
from router.pool.health import health_status
from router.pool.pool import Pool
from router.pool.snapshot import ModelSnapshot
from router.pool.state import ModelState
from router.pool.supervisor import Supervisor
from router.resources.report import ResourceReport
from router.servicers.convert import (
    model_to_pb,
    server_to_pb,
    status_event_to_pb,
    summary_to_pb,
    timestamp,
)
from router.status import FullStatus, ServerSnapshot, StatusHub
from router.telemetry.summary import Stats, Summary
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_control_service_pb2_grpc, model_pb2

Context = grpc.aio.ServicerContext[Any, Any]

_HEALTH_TO_PB = {
    "healthy": mpb.MODEL_HEALTH_STATUS_HEALTHY,
    "degraded": mpb.MODEL_HEALTH_STATUS_DEGRADED,
    "down": mpb.MODEL_HEALTH_STATUS_DOWN,
    "not_running": mpb.MODEL_HEALTH_STATUS_NOT_RUNNING,
}
# GetModelLogs replies at most this many lines, whatever is asked: the ring may hold up to
# 100,000 (system.log_ring_lines), and one admin call should not build a reply that large.
_MAX_LOG_LINES = 2000


class ModelControlServicer(model_control_service_pb2_grpc.ModelControlServiceServicer):
    def __init__(
        self,
        pool: Pool,
        hub: StatusHub,
        server: Callable[[], ServerSnapshot],
        resources: Callable[[str], ResourceReport],
        summary: Callable[[Collection[str]], Summary],
        heartbeat_sec: float,
    ) -> None:
        self._summary = summary
        self._pool = pool
        self._hub = hub
        self._server = server
        self._resources = resources
        self._heartbeat_sec = heartbeat_sec

    async def ListModels(
        self, request: mpb.ListModelsRequest, context: Context
    ) -> mpb.ListModelsResponse:
        snapshots = self._snapshots()
        return mpb.ListModelsResponse(
            models=[model_to_pb(s) for s in snapshots],
            server=server_to_pb(self._server()),
            summary=summary_to_pb(snapshots),
        )

    async def GetModel(
        self, request: mpb.GetModelRequest, context: Context
    ) -> mpb.GetModelResponse:
        return mpb.GetModelResponse(model=self._model(request.model))

    async def LoadModel(
        self, request: mpb.LoadModelRequest, context: Context
    ) -> mpb.LoadModelResponse:
        timeout = _seconds(request.timeout_sec, "timeout_sec")
        supervisor = self._pool.get(request.model)
        await supervisor.load(request.wait, timeout)
        return mpb.LoadModelResponse(model=model_to_pb(supervisor.snapshot()))

    async def UnloadModel(
        self, request: mpb.UnloadModelRequest, context: Context
    ) -> mpb.UnloadModelResponse:
        drain_timeout = _seconds(request.drain_timeout_sec, "drain_timeout_sec")
        supervisor = self._pool.get(request.model)
        was_running = await supervisor.unload(force=request.force, drain_timeout=drain_timeout)
        return mpb.UnloadModelResponse(
            model=model_to_pb(supervisor.snapshot()), was_running=was_running
        )

    async def ResetModel(
        self, request: mpb.ResetModelRequest, context: Context
    ) -> mpb.ResetModelResponse:
        supervisor = self._pool.get(request.model)
        was_failed, previous = supervisor.reset()
        return mpb.ResetModelResponse(
            model=model_to_pb(supervisor.snapshot()),
            was_failed=was_failed,
            previous_error=previous,
        )

    async def WatchModels(
        self, request: mpb.WatchModelsRequest, context: Context
    ) -> AsyncIterator[mpb.WatchModelsResponse]:
        principal = current_principal()
        # Headers first: a resume with nothing to replay has no event to carry them until
        # the first heartbeat, and the facade answers its HTTP client once they arrive.
        await context.send_initial_metadata(())
        async for event in self._hub.subscribe(request.last_event_id, self._heartbeat_sec):
            payload = event.payload
            if isinstance(payload, ModelSnapshot) and not principal.may_use(payload.alias):
                continue
            if isinstance(payload, FullStatus):
                models = tuple(m for m in payload.models if principal.may_use(m.alias))
                event = replace(event, payload=replace(payload, models=models))
            yield status_event_to_pb(event)

    async def ListFailedModels(
        self, request: mpb.ListFailedModelsRequest, context: Context
    ) -> mpb.ListFailedModelsResponse:
        failed = []
        for snapshot in self._snapshots():
            if snapshot.state is ModelState.FAILED or snapshot.consecutive_failures:
                entry = mpb.FailedModel(
                    model=snapshot.alias,
                    attempts=snapshot.consecutive_failures,
                    error=snapshot.last_error,
                    circuit_open=snapshot.state is ModelState.FAILED,
                )
                stamp = timestamp(snapshot.retry_at)
                if stamp is not None:
                    entry.retry_at.CopyFrom(stamp)
                failed.append(entry)
        return mpb.ListFailedModelsResponse(failed_models=failed)

    async def GetQueueStats(
        self, request: mpb.GetQueueStatsRequest, context: Context
    ) -> mpb.GetQueueStatsResponse:
        response = mpb.GetQueueStatsResponse()
        summary = response.summary
        for supervisor in self._supervisors():
            queue = supervisor.queue
            counters = queue.counters
            stats = response.per_model[supervisor.alias]
            stats.queue_length = queue.waiting
            stats.current_processing = queue.running
            stats.slots = supervisor.settings.spec.slots
            stats.max_queue_size = queue.max_waiting
            stats.total_requests = counters.total_requests
            stats.total_processed = counters.total_processed
            stats.total_rejected = counters.total_rejected
            stats.total_timed_out = counters.total_timed_out
            stats.total_cancelled = counters.total_cancelled
            stats.total_failed = counters.total_failed
            for priority, count in queue.count_by_priority().items():
                stats.queued_by_priority[priority.name.lower()] = count
            summary.total_queued += queue.waiting
            summary.total_processing += queue.running
            summary.total_processed += counters.total_processed
            summary.total_rejected += counters.total_rejected
            summary.total_timed_out += counters.total_timed_out
            summary.total_cancelled += counters.total_cancelled
            summary.total_failed += counters.total_failed
        return response

    async def GetResources(
        self, request: mpb.GetResourcesRequest, context: Context
    ) -> mpb.GetResourcesResponse:
        if request.model:
            self._pool.get(request.model)
        report = self._resources(request.model)
        return mpb.GetResourcesResponse(
            cpu_mode=report.cpu_mode,
            devices=[
                mpb.Device(
                    id=d.id,
                    name=d.name,
                    total_mib=d.total_mib,
                    used_mib=d.used_mib,
                    free_mib=d.free_mib,
                    reserved_mib=d.reserved_mib,
                    simulated=d.simulated,
                )
                for d in report.devices
            ],
            models=[
                mpb.ModelMemory(
                    model=m.alias,
                    device=m.device,
                    state=model_pb2.ModelState.Value(f"MODEL_STATE_{m.state.name}"),
                    estimate_mib=m.estimate_mib,
                    measured_mib=m.measured_mib,
                    weights_mib=m.weights_mib,
                    kv_cache_mib=m.kv_cache_mib,
                    fits=m.fits,
                )
                for m in report.models
                if current_principal().may_use(m.alias)
            ],
            loadable_models=visible(report.loadable),
        )

    async def GetModelHealth(
        self, request: mpb.GetModelHealthRequest, context: Context
    ) -> mpb.GetModelHealthResponse:
        response = mpb.GetModelHealthResponse()
        for supervisor in self._supervisors():
            record = self._pool.liveness.record(supervisor.alias)
            health = response.models[supervisor.alias]
            health.status = _HEALTH_TO_PB[health_status(record, supervisor.state).value]
            health.uptime_percent = record.uptime_percent
            health.consecutive_failures = record.consecutive_failures
            health.avg_probe_ms = record.avg_probe_ms
            health.probes = record.probes
            health.replacements = record.replacements
            stamp = timestamp(record.last_check)
            if stamp is not None:
                health.last_check.CopyFrom(stamp)
        return response

    async def GetTelemetrySummary(
        self, request: mpb.GetTelemetrySummaryRequest, context: Context
    ) -> mpb.GetTelemetrySummaryResponse:
        summary = self._summary({s.alias for s in self._supervisors()})
        return mpb.GetTelemetrySummaryResponse(
            window_sec=summary.window_sec,
            total=_stats_to_pb(summary.total),
            per_model={alias: _stats_to_pb(stats) for alias, stats in summary.per_model.items()},
        )

    async def GetModelLogs(
        self, request: mpb.GetModelLogsRequest, context: Context
    ) -> mpb.GetModelLogsResponse:
        if request.lines < 0:
            raise InvalidRequest("lines must not be negative")
        supervisor = self._pool.get(request.model)
        count = min(request.lines or 200, _MAX_LOG_LINES)
        return mpb.GetModelLogsResponse(lines=supervisor.tail_log(count))

    def _supervisors(self) -> list[Supervisor]:
        """The models the caller may see (every model when auth is off)."""
        principal = current_principal()
        return [s for s in self._pool.supervisors() if principal.may_use(s.alias)]

    def _snapshots(self) -> list[ModelSnapshot]:
        return [s.snapshot() for s in self._supervisors()]

    def _model(self, alias: str) -> model_pb2.Model:
        return model_to_pb(self._pool.get(alias).snapshot())


def _seconds(value: float, field: str) -> float | None:
    """A request's duration field in seconds; 0 (unset) means the configured default (None).

    Only finite, non-negative values pass: the value ends up as an asyncio timeout, and a NaN
    deadline corrupts the event loop's timer heap (NaN compares false with everything), which
    stalls every timer of the router: later streams, probes and the graceful stop all hang.
    """
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{field} must be a finite number of seconds >= 0 (got {value})")
    return value or None


def _stats_to_pb(stats: Stats) -> mpb.TelemetryStats:
    return mpb.TelemetryStats(
        requests=stats.requests,
        errors_4xx=stats.errors_4xx,
        errors_5xx=stats.errors_5xx,
        cancelled=stats.cancelled,
        error_rate=stats.error_rate,
        latency_p50_ms=stats.latency_p50_ms,
        latency_p95_ms=stats.latency_p95_ms,
        ttft_p50_ms=stats.ttft_p50_ms,
        ttft_p95_ms=stats.ttft_p95_ms,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        tokens_per_second=stats.tokens_per_second,
    )
