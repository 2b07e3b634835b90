"""The Grafana dashboard charts only metrics that exist, in PromQL that Prometheus accepts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from facade.metrics import FacadeMetrics
from router.inference import CHAT, COMPLETION, EMBEDDINGS
from router.telemetry.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "router" / "telemetry" / "dashboard.json"
PROMTOOL = str(Path(sys.executable).parent / "promtool")
METRIC = re.compile(r"\b(routermodel_[a-zA-Z0-9_]+)\b")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
# The sample names a family of each type exposes, after its family name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", ())


def expressions(document: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(document) for target in panel.get("targets", ())]


def exposed_names() -> set[str]:
    """Every sample name the router's and the facade's registries can expose."""
    router = RouterMetrics(["chat"], [CHAT, COMPLETION, EMBEDDINGS])
    router.watch(list, list)  # the gauges read at scrape time, with nothing to read
    names = set()
    for registry in (router.registry, FacadeMetrics().registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def test_every_metric_the_dashboard_uses_exists(dashboard: dict[str, Any]) -> None:
    queries = expressions(dashboard) + [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    used = {name for query in queries for name in METRIC.findall(query)}

    assert used and used <= exposed_names(), sorted(used - exposed_names())
    for query in queries:
        assert METRIC.search(query), query


def test_it_covers_throughput_latency_queues_states_and_memory(dashboard: dict[str, Any]) -> None:
    text = "\n".join(expressions(dashboard))

    for needed in (
        "routermodel_requests_total",
        "routermodel_completion_tokens_total",
        "histogram_quantile(0.95, sum by (le, model) "
        "(rate(routermodel_time_to_first_token_seconds_bucket",
        "routermodel_request_duration_seconds_bucket",
        "routermodel_queued_requests",
        "routermodel_model_state",
        "routermodel_device_memory_used_bytes",
        "routermodel_model_memory_bytes",
    ):
        assert needed in text, needed


def test_every_expression_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = []
    for index, expression in enumerate(expressions(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, expression
        rules.append({"record": f"dashboard:panel_{index}", "expr": expression})
    path = tmp_path / "rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_have_unique_ids_and_the_prometheus_variable(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in panels(dashboard)]

    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"]
