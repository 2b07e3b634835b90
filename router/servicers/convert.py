"""Domain ⇄ proto conversions (the only place that knows both shapes)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from google.protobuf import timestamp_pb2

from router.inference import CHAT, COMPLETION, Chunks, Done, GenerateEvent, Loading, Queued
from router.pool.snapshot import LoadStage, ModelKind, ModelSnapshot
from router.pool.state import ModelState
from router.scheduler.queue import Priority
from router.status import FullStatus, Heartbeat, ServerSnapshot, ServerState, StatusEvent
from router.v1 import inference_service_pb2 as ipb
from router.v1 import model_control_service_pb2 as mpb
from router.v1 import model_pb2

STATE_TO_PB = {s: model_pb2.ModelState.Value(f"MODEL_STATE_{s.name}") for s in ModelState}
KIND_TO_PB = {k: model_pb2.ModelKind.Value(f"MODEL_KIND_{k.name}") for k in ModelKind}
STAGE_TO_PB = {
    s: model_pb2.LoadStage.Value(
        f"LOAD_STAGE_{s.name}" if s is not LoadStage.NONE else "LOAD_STAGE_UNSPECIFIED"
    )
    for s in LoadStage
}
SERVER_STATE_TO_PB = {s: model_pb2.ServerState.Value(f"SERVER_STATE_{s.name}") for s in ServerState}
PRIORITY_FROM_PB = {
    ipb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    ipb.PRIORITY_LOW: Priority.LOW,
    ipb.PRIORITY_NORMAL: Priority.NORMAL,
    ipb.PRIORITY_HIGH: Priority.HIGH,
}
KIND_FROM_PB = {ipb.GENERATE_KIND_CHAT: CHAT, ipb.GENERATE_KIND_COMPLETION: COMPLETION}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def model_to_pb(snapshot: ModelSnapshot) -> model_pb2.Model:
    model = model_pb2.Model(
        alias=snapshot.alias,
        state=STATE_TO_PB[snapshot.state],
        kind=KIND_TO_PB[snapshot.kind],
        port=snapshot.port,
        pid=snapshot.pid,
        slots=snapshot.slots,
        in_flight=snapshot.in_flight,
        queued=snapshot.queued,
        n_ctx=snapshot.n_ctx,
        pinned=snapshot.pinned,
        last_error=snapshot.last_error,
        consecutive_failures=snapshot.consecutive_failures,
        restarts=snapshot.restarts,
        device=snapshot.device,
        memory_estimate_mib=snapshot.memory_estimate_mib,
        memory_measured_mib=snapshot.memory_measured_mib,
        load_seconds=snapshot.load_seconds,
        ttl_sec=int(snapshot.ttl_sec),
        load_stage=STAGE_TO_PB[snapshot.load_stage],
    )
    for field, seconds in (
        ("state_since", snapshot.state_since),
        ("last_used_at", snapshot.last_used_at),
        ("retry_at", snapshot.retry_at),
        ("created_at", snapshot.created_at),
    ):
        stamp = timestamp(seconds)
        if stamp is not None:
            getattr(model, field).CopyFrom(stamp)
    return model


def server_to_pb(server: ServerSnapshot) -> model_pb2.ServerStatus:
    status = model_pb2.ServerStatus(
        state=SERVER_STATE_TO_PB[server.state],
        epoch=server.epoch,
        version=server.version,
        cpu_mode=server.cpu_mode,
    )
    for field, seconds in (("started_at", server.started_at), ("updated_at", server.updated_at)):
        stamp = timestamp(seconds)
        if stamp is not None:
            getattr(status, field).CopyFrom(stamp)
    return status


def summary_to_pb(models: Iterable[ModelSnapshot]) -> model_pb2.StatusSummary:
    snapshots = list(models)
    by_state = Counter(m.state.value for m in snapshots)
    return model_pb2.StatusSummary(total=len(snapshots), by_state=dict(by_state))


def full_status_to_pb(status: FullStatus) -> mpb.FullStatus:
    return mpb.FullStatus(
        server=server_to_pb(status.server),
        models=[model_to_pb(m) for m in status.models],
        summary=summary_to_pb(status.models),
    )


def status_event_to_pb(event: StatusEvent) -> mpb.WatchModelsResponse:
    response = mpb.WatchModelsResponse(revision=event.revision, event_id=event.event_id)
    payload = event.payload
    if isinstance(payload, FullStatus):
        response.full_status.CopyFrom(full_status_to_pb(payload))
    elif isinstance(payload, ModelSnapshot):
        response.model_update.CopyFrom(model_to_pb(payload))
    elif isinstance(payload, ServerSnapshot):
        response.server_update.CopyFrom(server_to_pb(payload))
    elif isinstance(payload, Heartbeat):
        response.heartbeat.server_state = SERVER_STATE_TO_PB[payload.server_state]
        stamp = timestamp(payload.timestamp)
        if stamp is not None:
            response.heartbeat.timestamp.CopyFrom(stamp)
    return response


def generate_event_to_pb(event: GenerateEvent) -> ipb.GenerateResponse:
    if isinstance(event, Chunks):
        return ipb.GenerateResponse(chunk=chunks_to_pb(event))
    if isinstance(event, Queued):
        return ipb.GenerateResponse(
            queued=ipb.Queued(position=event.position, queue_length=event.queue_length)
        )
    if isinstance(event, Loading):
        return ipb.GenerateResponse(
            loading=ipb.Loading(stage=STAGE_TO_PB[event.stage], elapsed_sec=event.elapsed_sec)
        )
    return ipb.GenerateResponse(end=done_to_pb(event))


def chunks_to_pb(chunks: Chunks) -> ipb.Chunk:
    return ipb.Chunk(data=chunks.data, text=chunks.text)


def done_to_pb(done: Done) -> ipb.End:
    usage, timing = done.usage, done.timing
    return ipb.End(
        chunk=None if done.last is None else chunks_to_pb(done.last),
        finish_reason=done.finish_reason,
        usage=ipb.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
        ),
        timing=ipb.Timing(
            queue_ms=timing.queue_ms,
            load_ms=timing.load_ms,
            ttft_ms=timing.ttft_ms,
            total_ms=timing.total_ms,
        ),
    )
