"""Wire the router together and run it: grpc.aio server, health, reflection, graceful stop.

gRPC is up and answering status before any model is loaded; preloads run in
the background. Stop order on SIGTERM/SIGINT: health NOT_SERVING, stop taking
calls and let running ones finish for ``grpc.grace_sec``, then stop the children.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auth import Authenticator, AuthInterceptor, presented_key
from router.config import Settings, TlsFiles
from router.inference import CHAT, COMPLETION, EMBEDDINGS, Engine, Limits
from router.interceptors import CancelledCallInterceptor, ErrorInterceptor
from router.pool.pool import Pool
from router.pool.snapshot import ModelSnapshot
from router.resources.devices import HostMemory, Inventory, SimulatedGpu, SimulatedGpus
from router.resources.report import build_report
from router.servicers.inference import InferenceServicer
from router.servicers.model_control import ModelControlServicer
from router.status import FullStatus, ServerSnapshot, ServerState, StatusHub
from router.telemetry.metrics import RouterMetrics
from router.telemetry.status_file import StatusFileWriter
from router.telemetry.summary import RollingSummary
from router.telemetry.tracing import setup_tracing
from router.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    model_control_service_pb2,
    model_control_service_pb2_grpc,
)

_LOGGER = logging.getLogger(__name__)
VERSION = importlib.metadata.version("routermodel")
SERVICE_NAMES = (
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    model_control_service_pb2.DESCRIPTOR.services_by_name["ModelControlService"].full_name,
)
_MAX_SEND_BYTES = 256 * 1024 * 1024


def make_inventory(settings: Settings) -> Inventory:
    """Simulated GPUs when configured, NVML GPUs when available, else the host (CPU mode)."""
    system = settings.system
    if system.simulated_gpus:
        gpus = [SimulatedGpu(g.name, g.total_mib, g.used_mib) for g in system.simulated_gpus]
        return SimulatedGpus(gpus, system.gpu_devices)
    from router.resources.nvml import open_nvml

    nvml = open_nvml(system.gpu_devices)
    if nvml is not None:
        return nvml
    _LOGGER.info("no NVIDIA GPU (NVML unavailable): running in CPU mode")
    return HostMemory(system.memory_budget_mib)


class ListenError(Exception):
    """The router could not bind its gRPC (or metrics) address."""


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS for the router's port; with a client CA, clients must present a certificate.

    The files are checked with the ssl module first: gRPC only finds out when it binds, and
    then says no more than that it could not.
    """
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            tls.cert_file,
            tls.key_file,
            password=b"",  # an encrypted key fails, never prompts
        )
    except ssl.SSLError as error:
        raise ListenError(
            f"grpc.tls: {tls.cert_file} and {tls.key_file} are not a PEM certificate chain "
            f"and its key ({error.reason or error})"
        ) from None
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass(slots=True)
class _ServerInfo:
    state: ServerState
    started_at: float


class Router:
    """One router process: pool, status hub, engine and the gRPC server over them."""

    def __init__(self, settings: Settings, inventory: Inventory | None = None) -> None:
        self.settings = settings
        self.inventory = inventory or make_inventory(settings)
        self._info = _ServerInfo(ServerState.STARTING, time.time())
        aliases = list(settings.models)
        self.metrics = RouterMetrics(aliases, (CHAT, COMPLETION, EMBEDDINGS))
        self.summary = RollingSummary(aliases)
        self.hub = StatusHub(self._full_status)
        status_path = settings.telemetry.model_status_path
        self.status_file = StatusFileWriter(status_path, self._full_status) if status_path else None
        self.pool = Pool(settings, self._publish, self.inventory, self.metrics)
        self.metrics.watch(self.pool.snapshots, self.inventory.devices)
        self.engine = Engine(
            self.pool,
            (self.metrics, self.summary),
            Limits.of(settings.system),
        )
        self.authenticator = Authenticator(settings.auth.api_keys)
        # grpc-stubs does not describe grpc_health's asyncio servicer.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_site: web.AppRunner | None = None
        self._tracer_provider: TracerProvider | None = None

    def _publish(self, payload: ModelSnapshot | ServerSnapshot) -> None:
        self.hub.publish(payload)
        if self.status_file is not None:
            self.status_file.changed()

    def server_snapshot(self) -> ServerSnapshot:
        return ServerSnapshot(
            state=self._info.state,
            started_at=self._info.started_at,
            epoch=self.hub.epoch,
            version=VERSION,
            cpu_mode=self.inventory.cpu_mode,
            updated_at=self.hub.updated_at,
        )

    def _full_status(self) -> FullStatus:
        return FullStatus(self.server_snapshot(), self.pool.snapshots())

    def _set_state(self, state: ServerState) -> None:
        self._info.state = state
        self._publish(self.server_snapshot())

    async def start(self) -> int:
        """Start serving; returns the bound port (``grpc.port`` 0 picks a free one)."""
        self._tracer_provider = setup_tracing(
            "routermodel-router", self.settings.telemetry.otlp_endpoint
        )
        await self.pool.start(traced=self._tracer_provider is not None)
        if self.status_file is not None:
            self.status_file.start()
        inference = InferenceServicer(self.engine)
        # Outermost first: tracing sees the final status, errors from auth are mapped too.
        interceptors: list[Any] = [
            ErrorInterceptor(),
            AuthInterceptor(self.authenticator, on_refused=inference.refused),
        ]
        if self._tracer_provider is not None:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            otel = aio_server_interceptor()  # type: ignore[no-untyped-call]
            # Inside OpenTelemetry's, within its span: records the calls that end early.
            interceptors[:0] = [otel, CancelledCallInterceptor()]
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # What the facade sends for the largest body it accepts.
                ("grpc.max_receive_message_length", self.settings.api.max_message_bytes),
                ("grpc.max_send_message_length", _MAX_SEND_BYTES),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", 0),
            ],
        )
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
        model_control_service_pb2_grpc.add_ModelControlServiceServicer_to_server(
            ModelControlServicer(
                self.pool,
                self.hub,
                self.server_snapshot,
                lambda model: build_report(self.pool, self.inventory, model),
                self.summary.summary,
                self.settings.system.heartbeat_sec,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        grpc_settings = self.settings.grpc
        host = grpc_settings.host
        if ":" in host and not host.startswith("["):  # an IPv6 literal: gRPC wants [::1]:port
            host = f"[{host}]"
        address = f"{host}:{grpc_settings.port}"
        try:
            if grpc_settings.tls is None:
                self.port = server.add_insecure_port(address)
            else:
                credentials = await asyncio.to_thread(server_credentials, grpc_settings.tls)
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise ListenError(f"cannot listen on {address}: is it in use?") from error
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _LOGGER.info("router serving on %s:%d", grpc_settings.host, self.port)
        if self.settings.telemetry.metrics_port is not None:
            await self._serve_metrics(grpc_settings.host, self.settings.telemetry.metrics_port)
        self.pool.start_preload(lambda: self._set_state(ServerState.SERVING))
        return self.port

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, drain calls up to grace, then stop every child."""
        if self._info.state is ServerState.SHUTTING_DOWN:
            return
        self._set_state(ServerState.SHUTTING_DOWN)
        # Status streams end with that update; open ones would otherwise hold the graceful stop
        # for all of grpc.grace_sec.
        self.hub.close()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grpc.grace_sec)
        await self.pool.shutdown()
        if self.status_file is not None:
            await self.status_file.stop()
        if self._metrics_site is not None:
            await self._metrics_site.cleanup()
        if self._tracer_provider is not None:
            # Flush what is buffered, bounded: an unreachable collector must not hang the stop.
            await asyncio.to_thread(self._tracer_provider.force_flush, 5000)
            await asyncio.to_thread(self._tracer_provider.shutdown)
        _LOGGER.info("router stopped")

    async def _serve_metrics(self, host: str, port: int) -> None:
        """Prometheus text on /metrics, from the event loop (the collector reads pool state)."""

        async def metrics(request: web.Request) -> web.Response:
            if not self.settings.telemetry.metrics_open:
                principal = self.authenticator.principal(presented_key(request.headers.items()))
                if principal is None:
                    return web.Response(status=401, text="a valid API key is required\n")
                if not (principal.scopes & {"monitor", "admin"}):
                    return web.Response(status=403, text="this key lacks the 'monitor' scope\n")
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise ListenError(f"cannot serve metrics on {host}:{port}: {error.strerror}") from None
        self._metrics_site = runner
        self.metrics_port = runner.addresses[0][1]
        _LOGGER.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
