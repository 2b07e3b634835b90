"""The README maps every seed endpoint to ours (or says why it was dropped)."""

from __future__ import annotations

import re

from tests.helpers import REPO

# Every route of the seed: reference/seed-inventory.md §1 (1.1 inference, 1.2 management,
# 1.3 monitoring, 1.4 the standalone status server) and the two more its README documents.
SEED_ENDPOINTS = (
    "POST /v1/chat/completions",
    "POST /v1/embeddings",
    "GET /v1/models",
    "POST /v1/models/eject",
    "GET /v1/models/{alias}/status",
    "POST /v1/models/{alias}/reset",
    "GET /v1/models/failed",
    "GET /v1/models/status",
    "GET /v1/models/status/stream",
    "GET /health",
    "GET /metrics",
    "GET /metrics/legacy",
    "GET /metrics/stream",
    "GET /metrics/report",
    "GET /v1/telemetry/summary",
    "GET /v1/health/models",
    "GET /v1/queue/stats",
    "GET /vram",
    "GET /vram/summary",
    "GET /vram/models/{alias}",
    "GET /status",
    "GET /status/stream",
    "GET /v1/models/status/file",
)
TABLE_HEADING = "### Endpoints: the seed's and ours"


def mapping_rows() -> dict[str, str]:
    """Each seed endpoint named in the first column of the README's table → its 'here' cell."""
    text = (REPO / "README.md").read_text()
    assert TABLE_HEADING in text
    section = text.split(TABLE_HEADING, 1)[1]
    rows: dict[str, str] = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for endpoint in re.findall(r"`((?:GET|POST) [^`]+)`", cells[0]):
            rows[endpoint] = cells[1]
    return rows


def test_every_seed_endpoint_has_a_row() -> None:
    rows = mapping_rows()
    missing = [endpoint for endpoint in SEED_ENDPOINTS if endpoint not in rows]
    assert missing == []


def test_every_row_says_what_happened() -> None:
    rows = mapping_rows()
    for endpoint in SEED_ENDPOINTS:
        here = rows[endpoint]
        assert here and here != "—", endpoint
        # A dropped endpoint says why (more than the word).
        if "dropped" in here:
            assert len(here.split(":", 1)[-1].split()) >= 5, endpoint


def test_the_list_and_the_table_agree() -> None:
    """Guard the guard: the table names no seed endpoint missing from the list above, so the
    list stays the whole seed surface, and a dropped endpoint's row parses as dropped."""
    rows = mapping_rows()
    assert sorted(set(rows) - set(SEED_ENDPOINTS)) == []
    assert "dropped" in rows["GET /metrics/report"]
    assert "dropped" in rows["GET /metrics/legacy"]
