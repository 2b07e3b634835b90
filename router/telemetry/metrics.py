"""Prometheus metrics of the router: every family defined here is fed.

Labels are bounded: ``model`` only ever takes configured aliases (series are
created at start for each of them, and a request for an unknown alias is
refused before anything is counted), ``status`` is a class (2xx, 4xx, 5xx,
cancelled), ``reason`` an ErrorReason name (or DEADLINE: the caller's own
deadline passed). Point-in-time values (in flight, queued, memory) are read at
scrape time by a collector that only reads: a scrape never loads a model or
touches an idle timer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from router.pool.snapshot import ModelSnapshot
from router.pool.state import ModelState
from router.resources.devices import DeviceInfo
from router.telemetry.records import RequestOutcome

PREFIX = "routermodel"
# Latency buckets from 1 ms (tiny models, TTFT) to 10 min (big models, long generations).
_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    600,
)
_TOKEN_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_MIB = 1024 * 1024

STATUS_CLASSES = ("2xx", "4xx", "5xx", "cancelled")
_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_class(code: grpc.StatusCode | None) -> str:
    """The HTTP status class the facade maps ``code`` to (None = success)."""
    if code is None:
        return "2xx"
    if code is grpc.StatusCode.CANCELLED:
        return "cancelled"
    return "4xx" if code in _CLIENT_ERRORS else "5xx"


class _LiveState(Collector):
    """Gauges read from the pool at scrape time."""

    def __init__(
        self,
        snapshots: Callable[[], Sequence[ModelSnapshot]],
        devices: Callable[[], Sequence[DeviceInfo]],
    ) -> None:
        self._snapshots = snapshots
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_in_flight_requests", "Requests running upstream.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_queued_requests", "Requests waiting for a slot or a load.", labels=["model"]
        )
        slots = GaugeMetricFamily(
            f"{PREFIX}_model_slots",
            "Slots open to requests: the model's concurrency limit while READY, else 0.",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            f"{PREFIX}_model_memory_bytes",
            "Device memory of each model, estimated and measured (0 when unknown).",
            labels=["model", "kind"],
        )
        for snapshot in self._snapshots():
            in_flight.add_metric([snapshot.alias], snapshot.in_flight)
            queued.add_metric([snapshot.alias], snapshot.queued)
            # The configured limit alone never moves; what a dashboard needs next to the
            # in-flight gauge is the capacity actually on offer, which is 0 while not serving.
            open_slots = snapshot.slots if snapshot.state is ModelState.READY else 0
            slots.add_metric([snapshot.alias], open_slots)
            memory.add_metric([snapshot.alias, "estimate"], snapshot.memory_estimate_mib * _MIB)
            memory.add_metric([snapshot.alias, "measured"], snapshot.memory_measured_mib * _MIB)
        used = GaugeMetricFamily(
            f"{PREFIX}_device_memory_used_bytes", "Memory in use per device.", labels=["device"]
        )
        free = GaugeMetricFamily(
            f"{PREFIX}_device_memory_free_bytes", "Memory free per device.", labels=["device"]
        )
        for device in self._devices():
            used.add_metric([device.id], device.used_mib * _MIB)
            free.add_metric([device.id], max(0, device.total_mib - device.used_mib) * _MIB)
        yield from (in_flight, queued, slots, memory, used, free)


class RouterMetrics:
    """The router's metric families and the events that feed them."""

    def __init__(self, aliases: Sequence[str], endpoints: Sequence[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace=f"{PREFIX}_router", registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests by model, endpoint and status class.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections",
            "Requests refused before reaching a model, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time requests waited for a slot (loads excluded; those that gave up included).",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.load_wait = Histogram(
            f"{PREFIX}_load_seconds",
            "Time from spawning a child to it being ready.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first upstream output.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_seconds",
            "Mean time between generated tokens of a streamed request.",
            ["model"],
            buckets=_TOKEN_SECONDS,
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's arrival to its end.",
            ["model", "endpoint"],
            buckets=_SECONDS,
            registry=r,
        )
        self.restarts = Counter(
            f"{PREFIX}_model_restarts",
            "Children started again after the first start.",
            ["model"],
            registry=r,
        )
        self.evictions = Counter(
            f"{PREFIX}_model_evictions",
            "Models unloaded to make room for another.",
            ["model"],
            registry=r,
        )
        self.idle_unloads = Counter(
            f"{PREFIX}_model_idle_unloads",
            "Models unloaded after their idle TTL.",
            ["model"],
            registry=r,
        )
        self.crashes = Counter(
            f"{PREFIX}_model_crashes",
            "Children that exited or hung while serving.",
            ["model"],
            registry=r,
        )
        self.state = Gauge(
            f"{PREFIX}_model_state",
            "1 for each model's current lifecycle state, 0 for the others.",
            ["model", "state"],
            registry=r,
        )
        for alias in aliases:
            for state in ModelState:
                self.state.labels(alias, state.value).set(1 if state is ModelState.STOPPED else 0)
            for endpoint in endpoints:
                for status in STATUS_CLASSES:
                    self.requests.labels(alias, endpoint, status)
                self.duration.labels(alias, endpoint)
            for family in (
                self.prompt_tokens,
                self.completion_tokens,
                self.queue_wait,
                self.load_wait,
                self.ttft,
                self.inter_token,
                self.restarts,
                self.evictions,
                self.idle_unloads,
                self.crashes,
            ):
                family.labels(alias)

    def watch(
        self,
        snapshots: Callable[[], Sequence[ModelSnapshot]],
        devices: Callable[[], Sequence[DeviceInfo]],
    ) -> None:
        self.registry.register(_LiveState(snapshots, devices))

    def on_transition(self, alias: str, old: ModelState, new: ModelState) -> None:
        self.state.labels(alias, old.value).set(0)
        self.state.labels(alias, new.value).set(1)

    def on_loaded(self, alias: str, seconds: float, restart: bool) -> None:
        self.load_wait.labels(alias).observe(seconds)
        if restart:
            self.restarts.labels(alias).inc()

    def on_evicted(self, alias: str) -> None:
        self.evictions.labels(alias).inc()

    def on_idle_unload(self, alias: str) -> None:
        self.idle_unloads.labels(alias).inc()

    def on_crash(self, alias: str) -> None:
        self.crashes.labels(alias).inc()

    def record(self, outcome: RequestOutcome) -> None:
        model = outcome.model
        self.requests.labels(model, outcome.endpoint, status_class(outcome.code)).inc()
        self.duration.labels(model, outcome.endpoint).observe(outcome.duration)
        if outcome.served or outcome.queue_wait:  # those that gave up waiting count too
            self.queue_wait.labels(model).observe(outcome.queue_wait)
        if not outcome.served:
            if outcome.code is not None and outcome.code is not grpc.StatusCode.CANCELLED:
                self.rejections.labels(model, outcome.reason.lower() or "unknown").inc()
            return
        if outcome.ttft and outcome.streamed:  # a whole response is no first token
            self.ttft.labels(model).observe(outcome.ttft)
        if outcome.inter_token:
            self.inter_token.labels(model).observe(outcome.inter_token)
        if outcome.prompt_tokens:
            self.prompt_tokens.labels(model).inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            self.completion_tokens.labels(model).inc(outcome.completion_tokens)
