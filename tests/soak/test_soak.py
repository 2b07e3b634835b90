"""The soak over real router, facade and llama-server processes on the tiny models.

Two models swap (`max_concurrent_models: 1`) under mixed chat, streamed chat, embeddings and
admin traffic with random disconnects (tests/soak/driver.py). Right after the clients stop,
before any model is unloaded, no slot is busy and no waiter queued, and the router's own count
of the requests it finished agrees with the clients' ledger (every request accounted for, by
outcome); once the pool is emptied, file descriptors are back to their count after the warm-up,
and the router's and facade's memory did not grow between the second and the last window. The
30 s variant runs in `make test`; the 5-minute one is marked `soak` (`make soak`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.stack import facade_process
from tests.helpers import chat_model, embed_model, free_port, router_process, write_config
from tests.procfs import children, launchers_from_stdin
from tests.soak.driver import Ledger, canonical_fds, quiesce, router_requests, settle, soak

SEED = 20_251_125
CLIENTS = 4
# Allowed drift of open file descriptors, and of RSS between the second and the last window.
FD_SLACK = 5
RSS_GROWTH = 1.10


async def run_soak(
    directory: Path, tiny_chat: Path, tiny_embed: Path, *, duration: float, window: float
) -> Ledger:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    models = {"chat": chat_model(tiny_chat), "embed": embed_model(tiny_embed)}
    system = {
        "max_concurrent_models": 1,
        "queue_timeout_sec": 30,
        "drain_timeout_sec": 5,
    }
    config = write_config(
        directory,
        models,
        system=system,
        grpc_port=grpc_port,
        api={"port": http_port},
        telemetry={"metrics_port": metrics_port},
    )
    base_url = f"http://127.0.0.1:{http_port}"
    router_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    with (
        router_process(config, grpc_port, log=directory / "router.log") as router,
        facade_process(config, http_port, log=directory / "facade.log") as facade,
    ):
        pids = {"router": router.pid, "facade": facade.pid}
        # Warm-up: every kind of request, both models loaded at least once, then a quiet,
        # empty pool as the reference point for file descriptors.
        await soak(base_url, pids, window / 2, clients=CLIENTS, seed=SEED - 1)
        await settle(base_url)
        fds_before = await canonical_fds(pids)
        counted_before = await router_requests(router_metrics)

        ledger = await soak(base_url, pids, duration, clients=CLIENTS, seed=SEED)

        stats = await quiesce(base_url)  # before settle(), whose unloads would free any leak
        ledger.router = await router_requests(router_metrics) - counted_before
        await settle(base_url)
        ledger.fds_before, ledger.fds_after = fds_before, await canonical_fds(pids)
        print("\n" + ledger.report(window))
        # Every model's child stopped, none orphaned: at most the idle spare launcher is left.
        left = children(router.pid)
        assert len(left) <= 1 and left == launchers_from_stdin(router.pid)
    summary = stats["summary"]
    assert summary["total_queued"] == summary["total_processing"] == 0
    assert all(
        m["queue_length"] == m["current_processing"] == 0 for m in stats["per_model"].values()
    )
    return ledger


def check(ledger: Ledger, window: float) -> None:
    assert ledger.unclean == [], ledger.unclean
    assert ledger.started == ledger.accounted  # the clients' side: no exception escaped
    assert ledger.reconcile() == [], ledger.reconcile()  # the router's side agrees
    kinds = {kind for kind, _ in ledger.requests}
    assert {"chat", "chat_stream", "embeddings", "load", "unload"} <= kinds
    assert (
        ledger.requests[("chat_stream", "completed")]
        and ledger.requests[("embeddings", "completed")]
    )
    assert ledger.disconnects["mid-stream"] and ledger.disconnects["waiting"]
    assert ledger.loads["chat"] >= 2 and ledger.loads["embed"] >= 2, ledger.loads  # they swapped
    for name, before in ledger.fds_before.items():
        assert abs(ledger.fds_after[name] - before) <= FD_SLACK, (name, before, ledger.fds_after)
        second = ledger.window_rss(name, window, 2 * window)
        last = ledger.window_rss(name, ledger.duration_sec - window, ledger.duration_sec + 1)
        assert last <= second * RSS_GROWTH, (name, second, last)


async def test_soak_30_seconds(tmp_path: Path, tiny_chat: Path, tiny_embed: Path) -> None:
    ledger = await run_soak(tmp_path, tiny_chat, tiny_embed, duration=30, window=10)
    check(ledger, window=10)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_soak_5_minutes(tmp_path: Path, tiny_chat: Path, tiny_embed: Path) -> None:
    ledger = await run_soak(tmp_path, tiny_chat, tiny_embed, duration=300, window=60)
    check(ledger, window=60)
