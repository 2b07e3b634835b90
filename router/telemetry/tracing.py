"""OpenTelemetry tracing setup, shared by the router and the facade.

Export is on when ``telemetry.otlp_endpoint`` or the standard
``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set (and ``OTEL_SDK_DISABLED`` is
not): OTLP over gRPC, batched. Without it nothing is installed and the API's
no-op tracer costs nothing on the hot path.

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
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
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
