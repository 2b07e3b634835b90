"""The seed's monitoring routes: `GET /metrics/stream`, `GET /v1/models/status/file`, and the
seed-compatible events of `GET /v1/models/status/stream`.

`/metrics/stream` is SSE: an `event: metrics` at once and then every `METRICS_INTERVAL_SEC`, a
snapshot built from three read-only RPCs (ListModels, GetTelemetrySummary, GetResources; none
loads a model or touches an idle timer)::

    event: metrics
    data: {"timestamp": "...Z", "server": {...}, "devices": [...], "models": [...],
           "totals": {...}, "window_sec": 60.0}

While the router does not answer, an `event: heartbeat` takes the snapshot's place
(`{"timestamp", "router_connected": false, "error"}`), so the stream outlives a router restart
(an EventSource would not reconnect after an HTTP error). A key the router refuses is the
HTTP answer (401/403) instead, since the stream could never show anything.

`/v1/models/status/file` serves the router's `model_status.json` (`telemetry.model_status_path`)
as written, also while the router is down. It shows every model and its child's port, so with
API keys configured the caller's key must have the monitor scope, like the other status routes:
the router is asked with a cheap monitor-scope call (GetQueueStats) made with that key.

`/v1/models/status/stream` is the bridge's WatchModels route (same request, `id:` = the event
id `<epoch>-<revision>`, `Last-Event-ID` resume), but its events keep the seed's payloads so
seed dashboards keep working (`seed_status_frame`): `full_status` is
`{server, models: {alias: {...}}, summary: {total, by_status}}`, `model_update` one model
`{alias, status, port, started_at, last_used_at, load_progress, error_message, vram_used_mb,
updated_at, ...}`, `server_update` `{status, started_at, updated_at, ...}`, `heartbeat`
`{timestamp, server_status}`. Status words are the seed's (`off`, `starting`, `loading`,
`ready`, `stopping`, `failed`; the router `starting`, `ready`, `shutting_down`); our exact state
rides along as `state`, and the fields the seed did not have follow its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Final, TypeVar

from aiohttp import web
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from clients import AuthenticationError, PermissionDeniedError, RouterError, map_rpc_errors
from facade.bridge import FrameRenderer, message_json, stream_frame
from facade.context import call_metadata, check_monitor_scope
from facade.errors import ApiError, from_router_error
from facade.keys import CLIENT, SETTINGS, STREAMS
from facade.sse import bridge_error_frame, event_frame
from router.v1 import model_control_service_pb2, model_pb2

__all__ = [
    "METRICS_INTERVAL_SEC",
    "SEED_STREAM_FRAMES",
    "openapi_paths",
    "seed_status_frame",
    "setup_routes",
]

_LOGGER = logging.getLogger(__name__)

METRICS_INTERVAL_SEC = 2.0
# Each RPC of a snapshot; a snapshot is late by at most this much.
_RPC_TIMEOUT_SEC = 1.5
STREAM_ROUTE: Final = "/metrics/stream"
FILE_ROUTE: Final = "/v1/models/status/file"
SEED_STREAM_ROUTE: Final = "/v1/models/status/stream"
_T = TypeVar("_T")


def setup_routes(app: web.Application) -> None:
    """Mount both routes on `app`."""
    app.router.add_route("GET", STREAM_ROUTE, metrics_stream)
    app.router.add_route("GET", FILE_ROUTE, status_file)


async def metrics_stream(request: web.Request) -> web.StreamResponse:
    """SSE of periodic snapshots (see the module docstring)."""
    metadata = call_metadata(request)
    first = await _event(request, metadata)  # before the headers: a refused key is a 401/403
    async with request.app[STREAMS].open(request, bridge_error_frame) as stream:
        await stream.write(first)
        while True:
            await asyncio.sleep(METRICS_INTERVAL_SEC)
            await stream.write(await _event(request, metadata))
    return stream.response  # after shutdown ended the stream with its error event


async def _event(request: web.Request, metadata: tuple[tuple[str, str], ...]) -> bytes:
    """A `metrics` frame, or a `heartbeat` one while the router does not answer."""
    try:
        document = await _snapshot(request, metadata)
    except (AuthenticationError, PermissionDeniedError):
        raise
    except RouterError as error:
        heartbeat = {
            "timestamp": _now(),
            "router_connected": False,
            "error": from_router_error(error).message,
        }
        return event_frame("heartbeat", json.dumps(heartbeat, separators=(",", ":")))
    return event_frame("metrics", json.dumps(document, separators=(",", ":")))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def _snapshot(request: web.Request, metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """One `metrics` event: server, devices, per-model state and figures, totals."""
    control = request.app[CLIENT].control
    calls = (
        control.ListModels(
            model_control_service_pb2.ListModelsRequest(),
            metadata=metadata,
            timeout=_RPC_TIMEOUT_SEC,
        ),
        control.GetTelemetrySummary(
            model_control_service_pb2.GetTelemetrySummaryRequest(),
            metadata=metadata,
            timeout=_RPC_TIMEOUT_SEC,
        ),
        control.GetResources(
            model_control_service_pb2.GetResourcesRequest(),
            metadata=metadata,
            timeout=_RPC_TIMEOUT_SEC,
        ),
    )
    # Wait for all three, so none is left running (or failing unobserved) after an error.
    models, summary, resources = await asyncio.gather(*calls, return_exceptions=True)
    with map_rpc_errors():
        return _document(_unwrap(models), _unwrap(summary), _unwrap(resources))


def _unwrap(result: _T | BaseException) -> _T:
    if isinstance(result, BaseException):
        raise result
    return result


def _document(
    models: model_control_service_pb2.ListModelsResponse,
    summary: model_control_service_pb2.GetTelemetrySummaryResponse,
    resources: model_control_service_pb2.GetResourcesResponse,
) -> dict[str, Any]:
    server = models.server
    started = server.started_at.ToSeconds() if server.HasField("started_at") else 0
    return {
        "timestamp": _now(),
        "server": {
            "status": _word(model_pb2.ServerState, server.state),
            "version": server.version,
            "epoch": server.epoch,
            "cpu_mode": server.cpu_mode,
            "uptime_seconds": round(time.time() - started, 3) if started else 0.0,
        },
        "devices": [message_json(device) for device in resources.devices],
        "models": [_model(model, summary.per_model.get(model.alias)) for model in models.models],
        "totals": message_json(summary.total),
        "window_sec": summary.window_sec,
    }


def _model(
    model: model_pb2.Model, stats: model_control_service_pb2.TelemetryStats | None
) -> dict[str, Any]:
    figures = message_json(stats or model_control_service_pb2.TelemetryStats())
    return {
        "alias": model.alias,
        "status": _word(model_pb2.ModelState, model.state),
        "kind": _word(model_pb2.ModelKind, model.kind),
        "port": model.port,
        "device": model.device,
        "slots": model.slots,
        "in_flight": model.in_flight,
        "queued": model.queued,
        "memory_mib": model.memory_measured_mib or model.memory_estimate_mib,
        **figures,
    }


def _word(enum: Any, value: int) -> str:
    """An enum value as a lower-case word without its prefix: MODEL_STATE_READY → "ready".
    The prefix is the zero value's name minus "UNSPECIFIED" (every router.v1 enum has one)."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    try:
        name = str(enum.Name(value))
    except ValueError:  # a newer router's value: the stream goes on, as the typed client does
        return "unknown"
    return name.removeprefix(prefix).lower()


async def status_file(request: web.Request) -> web.Response:
    """`model_status.json` as the router last wrote it; 404 when not configured or not written."""
    settings = request.app[SETTINGS]
    path = settings.telemetry.model_status_path
    if path is None:
        raise ApiError(404, "no status file is configured (telemetry.model_status_path)")
    if settings.auth.api_keys:
        # The file lists every alias and its child's port, whatever models a key may use:
        # monitor-scope information, checked by the router on a monitor-scope call.
        await check_monitor_scope(request, _RPC_TIMEOUT_SEC)
    try:
        body = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise ApiError(404, "the status file has not been written yet") from None
    except OSError as error:
        _LOGGER.error("cannot read the status file %s: %s", path, error.strerror)
        raise ApiError(503, "the status file cannot be read", type="server_error") from None
    return web.Response(body=body, content_type="application/json")


# The seed's words for our states (its ModelStatusTracker's vocabulary). DRAINING, which the
# seed did not have, finishes in-flight work on the way to a stop.
_SEED_MODEL_STATUS: Final = {
    model_pb2.MODEL_STATE_STOPPED: "off",
    model_pb2.MODEL_STATE_STARTING: "starting",
    model_pb2.MODEL_STATE_LOADING: "loading",
    model_pb2.MODEL_STATE_READY: "ready",
    model_pb2.MODEL_STATE_DRAINING: "stopping",
    model_pb2.MODEL_STATE_STOPPING: "stopping",
    model_pb2.MODEL_STATE_FAILED: "failed",
}
_SEED_SERVER_STATUS: Final = {
    model_pb2.SERVER_STATE_STARTING: "starting",
    model_pb2.SERVER_STATE_SERVING: "ready",
    model_pb2.SERVER_STATE_SHUTTING_DOWN: "shutting_down",
}
# The seed's load_progress was only ever null, 0 or 100.
_LOAD_PROGRESS: Final = {
    model_pb2.MODEL_STATE_STARTING: 0,
    model_pb2.MODEL_STATE_LOADING: 0,
    model_pb2.MODEL_STATE_READY: 100,
}


def _iso(timestamp: timestamp_pb2.Timestamp, present: bool) -> str | None:
    """ISO 8601 in UTC like the status file, None when unset."""
    if not present:
        return None
    return timestamp.ToDatetime(tzinfo=timezone.utc).isoformat()


def _when(message: Message, field: str) -> str | None:
    return _iso(getattr(message, field), message.HasField(field))


def _seed_server(server: model_pb2.ServerStatus) -> dict[str, Any]:
    return {
        "status": _SEED_SERVER_STATUS.get(server.state, "unknown"),
        "started_at": _when(server, "started_at"),
        "updated_at": _when(server, "updated_at"),
        # Ours, after the seed's fields.
        "state": _word(model_pb2.ServerState, server.state),
        "version": server.version,
        "epoch": server.epoch,
        "cpu_mode": server.cpu_mode,
    }


def _seed_model(model: model_pb2.Model) -> dict[str, Any]:
    """The seed's ModelStatusInfo for `model` (as in model_status.json), then our fields."""
    return {
        "alias": model.alias,
        "status": _SEED_MODEL_STATUS.get(model.state, "unknown"),
        "port": model.port or None,
        "started_at": _when(model, "state_since") if model.pid else None,
        "last_used_at": _when(model, "last_used_at"),
        "load_progress": _LOAD_PROGRESS.get(model.state),
        "error_message": model.last_error or None,
        "vram_used_mb": model.memory_measured_mib or model.memory_estimate_mib or None,
        "updated_at": _when(model, "state_since"),
        # Ours, after the seed's fields.
        "state": _word(model_pb2.ModelState, model.state),
        "kind": _word(model_pb2.ModelKind, model.kind),
        "load_stage": _word(model_pb2.LoadStage, model.load_stage),
        "pid": model.pid,
        "slots": model.slots,
        "in_flight": model.in_flight,
        "queued": model.queued,
        "n_ctx": model.n_ctx,
        "pinned": model.pinned,
        "consecutive_failures": model.consecutive_failures,
        "restarts": model.restarts,
        "retry_at": _when(model, "retry_at"),
        "device": model.device,
        "memory_estimate_mib": model.memory_estimate_mib,
        "memory_measured_mib": model.memory_measured_mib,
        "load_seconds": model.load_seconds,
        "ttl_sec": model.ttl_sec,
    }


def _seed_full_status(status: model_control_service_pb2.FullStatus) -> dict[str, Any]:
    models = {model.alias: _seed_model(model) for model in status.models}
    by_status: dict[str, int] = {}
    for model in models.values():
        by_status[model["status"]] = by_status.get(model["status"], 0) + 1
    return {
        "server": _seed_server(status.server),
        "models": models,
        "summary": {
            "total": status.summary.total,
            "by_status": by_status,
            # A proto map has no order: sorted, so equal states render the same bytes.
            "by_state": dict(sorted(status.summary.by_state.items())),
        },
    }


def _seed_heartbeat(heartbeat: model_control_service_pb2.Heartbeat) -> dict[str, Any]:
    return {
        "timestamp": _when(heartbeat, "timestamp"),
        "server_status": _SEED_SERVER_STATUS.get(heartbeat.server_state, "unknown"),
        "server_state": _word(model_pb2.ServerState, heartbeat.server_state),
    }


def seed_status_frame(response: Message) -> bytes:
    """A WatchModels event with the seed's event name and payload; `id:` resumes."""
    if not isinstance(response, model_control_service_pb2.WatchModelsResponse):
        return stream_frame(response)
    event = response.WhichOneof("event")
    if event == "full_status":
        payload = _seed_full_status(response.full_status)
    elif event == "model_update":
        payload = _seed_model(response.model_update)
    elif event == "server_update":
        payload = _seed_server(response.server_update)
    elif event == "heartbeat":
        payload = _seed_heartbeat(response.heartbeat)
    else:  # an event newer than this facade: the bridge's proto-JSON rather than nothing
        return stream_frame(response)
    data = json.dumps(payload, separators=(",", ":"))
    return event_frame(event, data, response.event_id)


# Streaming routes of the bridge whose events keep the seed's payloads.
SEED_STREAM_FRAMES: Final[dict[str, FrameRenderer]] = {SEED_STREAM_ROUTE: seed_status_frame}


# One event of the stream, as OpenAPI before 3.2 describes a `text/event-stream` response.
_STREAM_EVENT: Final = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["metrics", "heartbeat", "error"]},
        "data": {"type": "string"},
    },
}


def openapi_paths() -> dict[str, dict[str, Any]]:
    """The OpenAPI description of both routes."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        STREAM_ROUTE: {
            "get": {
                "operationId": "metricsStream",
                "tags": ["monitoring"],
                "summary": "Server-sent `metrics` snapshots every 2 s (`heartbeat` while the "
                "router does not answer)",
                "responses": {
                    "200": {
                        "description": "An endless event stream",
                        "content": {"text/event-stream": {"schema": _STREAM_EVENT}},
                    },
                    "401": {"description": "Missing or bad API key", "content": error},
                    "403": {"description": "The key lacks the scope", "content": error},
                },
            }
        },
        FILE_ROUTE: {
            "get": {
                "operationId": "modelStatusFile",
                "tags": ["monitoring"],
                "summary": "model_status.json as the router last wrote it",
                "responses": {
                    "200": {
                        "description": "The file: {server: {...}, models: {alias: {...}}}",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": {"description": "Missing or bad API key", "content": error},
                    "403": {"description": "The key lacks the scope", "content": error},
                    "404": {"description": "Not configured, or not written yet", "content": error},
                    "503": {
                        "description": "Unreadable, or the router cannot check the key",
                        "content": error,
                    },
                },
            }
        },
    }
