"""OpenTelemetry tracing setup, shared by the router and the facade.

Export is on when ``telemetry.otlp_endpoint`` or the standard
``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set: OTLP over gRPC, batched. The
configured endpoint wins (like an argument given in code over the environment, as
the OpenTelemetry SDKs do), then the traces-specific variable, then the generic one.
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn export off whatever
is configured. Without export nothing is installed and the API's no-op tracer
costs nothing on the hot path.

``CancelledCallInterceptor`` completes the public grpc.aio server instrumentation: a call the
client cancelled otherwise keeps ``rpc.grpc.status_code`` 0 (OK) on its span.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_LOGGER = logging.getLogger(__name__)


def otlp_endpoint(configured: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """Where to export spans, or None for no export."""
    # Parsed as the SDK parses it (trimmed, any case), so the two never disagree.
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    # The standard way to switch off one signal's exporter; other exporter names are not
    # ours to serve and leave OTLP on.
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    return (
        configured
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def setup_tracing(service_name: str, configured_endpoint: str | None) -> TracerProvider | None:
    """Install an exporting tracer provider, or return None when export is off."""
    endpoint = otlp_endpoint(configured_endpoint)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _LOGGER.info("tracing: exporting spans of %s to %s", service_name, endpoint)
    return provider
