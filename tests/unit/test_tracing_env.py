"""Which OTLP endpoint the router and facade export to, from config and the OTEL_* variables."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from router.telemetry.tracing import otlp_endpoint, setup_tracing

CONFIGURED = "http://config:4317"
TRACES = "http://traces-env:4317"
GENERIC = "http://generic-env:4317"


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        (None, {}, None),
        ("", {}, None),
        (CONFIGURED, {}, CONFIGURED),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC}, GENERIC),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": TRACES}, TRACES),
        # The traces-specific variable wins over the generic one, as in the OTel spec.
        (
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": TRACES},
            TRACES,
        ),
        # Configuration wins over both, like an argument given in code.
        (
            CONFIGURED,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": TRACES},
            CONFIGURED,
        ),
        # An empty variable counts as unset.
        (
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC},
            GENERIC,
        ),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
    ],
)
def test_endpoint_precedence(
    configured: str | None, env: dict[str, str], expected: str | None
) -> None:
    assert otlp_endpoint(configured, env) == expected


@pytest.mark.parametrize("value", ["true", "TRUE", "True", " true\n"])
def test_sdk_disabled_turns_export_off_whatever_is_configured(value: str) -> None:
    env = {"OTEL_SDK_DISABLED": value, "OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC}
    assert otlp_endpoint(CONFIGURED, env) is None
    assert otlp_endpoint(None, env) is None


@pytest.mark.parametrize("value", ["false", "", "0", "no", "yes"])
def test_sdk_disabled_only_for_true(value: str) -> None:
    # The SDK itself treats anything but "true" as enabled; so do we.
    assert otlp_endpoint(CONFIGURED, {"OTEL_SDK_DISABLED": value}) == CONFIGURED


@pytest.mark.parametrize(("value", "expected"), [("none", None), ("NONE", None), ("otlp", GENERIC)])
def test_traces_exporter_none_turns_export_off(value: str, expected: str | None) -> None:
    env = {"OTEL_TRACES_EXPORTER": value, "OTEL_EXPORTER_OTLP_ENDPOINT": GENERIC}
    assert otlp_endpoint(None, env) == expected


def test_setup_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[trace.TracerProvider] = []
    # The global provider can be set once per process: keep it for the tests that need it.
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert setup_tracing("routermodel-router", CONFIGURED) is None
    assert installed == []

    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1")
    provider = setup_tracing("routermodel-router", None)
    try:
        assert isinstance(provider, TracerProvider)
        assert installed == [provider]
        assert provider.resource.attributes["service.name"] == "routermodel-router"
    finally:
        assert provider is not None
        provider.shutdown()
