"""`python -m tests.bench.scheduling`: what scheduling costs, measured on a real router process.

Two tiny chat models (embedded llama-server children) and room for one of them
(`max_concurrent_models: 1`, `swap_batch_limit` 4, 2 slots each):

* swap: request -> first token for a model that must first evict the other and load, over
  alternating requests A B A B ... (each runs alone, so all of it is the swap);
* burst: 60 streamed requests at once to one loaded model, 20 each HIGH, NORMAL and LOW:
  the queue wait each priority saw (the router's own `queue_ms`), and where in the dispatch
  order the LOW ones ran (aging promotes a waiter passed over `aging_dispatches` times);
* mixed: 40 requests at once, alternating between the two models: the loads (from
  WatchModels), total time and the queue plus load wait of each request.

Prints one table and writes bench-results/scheduling.json. Usage:
`python -m tests.bench.scheduling [--swaps N] [--out PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients import Chunk, End, RouterClient
from router.embedded.demo import ensure_model
from tests.bench.__main__ import median, percentile
from tests.helpers import CACHE, REPO, free_port, router_process, write_config

PROMPT = [{"role": "user", "content": "hello world the router"}]
PRIORITIES = ("high", "normal", "low")


def _body(max_tokens: int) -> dict[str, Any]:
    return {"messages": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": 0}


async def _first_token(client: RouterClient, model: str) -> float:
    """Seconds from sending to the first text of a 16-token streamed request."""
    started = time.monotonic()
    first = 0.0
    async for event in client.generate(model, _body(16)):
        if isinstance(event, Chunk) and event.text and not first:
            first = time.monotonic() - started
    return first


async def swaps(client: RouterClient, count: int) -> dict[str, Any]:
    await _first_token(client, "a")  # a is loaded: the first measured request swaps to b
    seconds = [await _first_token(client, "b" if i % 2 == 0 else "a") for i in range(count)]
    ms = [s * 1000 for s in seconds]
    return {"swaps": count, "p50_ms": median(ms), "p95_ms": percentile(ms, 0.95), "max_ms": max(ms)}


async def _timed(client: RouterClient, model: str, priority: Any, order: list[str]) -> End:
    end: End | None = None
    async for event in client.generate(model, _body(32), priority=priority):
        if isinstance(event, End):
            end = event
    assert end is not None
    order.append(priority)
    return end


async def burst(client: RouterClient) -> dict[str, Any]:
    await _first_token(client, "a")  # loaded, so the waits are queueing only
    order: list[str] = []
    calls = [(PRIORITIES[i % 3], _timed(client, "a", PRIORITIES[i % 3], order)) for i in range(60)]
    ends = await asyncio.gather(*(call for _, call in calls))
    result: dict[str, Any] = {}
    for priority in PRIORITIES:
        waits = [e.timing.queue_ms for (p, _), e in zip(calls, ends, strict=True) if p == priority]
        result[priority] = {
            "p50_ms": median(waits),
            "p95_ms": percentile(waits, 0.95),
            "max_ms": max(waits),
        }
    low_positions = [i for i, p in enumerate(order) if p == "low"]
    result["first_low_done_at"] = low_positions[0] + 1
    result["last_high_done_at"] = max(i for i, p in enumerate(order) if p == "high") + 1
    return result


async def _count_loads(client: RouterClient, loads: list[str], stop: asyncio.Event) -> None:
    previous: dict[str, str] = {}
    async for event in client.watch():
        if stop.is_set():
            return
        model = event.model
        if event.kind == "model_update" and model is not None:
            if model.state == "ready" and previous.get(model.alias) != "ready":
                loads.append(model.alias)
            previous[model.alias] = model.state


async def mixed(client: RouterClient) -> dict[str, Any]:
    loads: list[str] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_count_loads(client, loads, stop))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    order: list[str] = []
    ends = await asyncio.gather(*(_timed(client, "ab"[i % 2], "normal", order) for i in range(40)))
    total = time.monotonic() - started
    stop.set()
    watcher.cancel()
    waits = [e.timing.queue_ms + e.timing.load_ms for e in ends]
    return {
        "requests": 40,
        "loads": len(loads),
        "total_s": total,
        "wait_p50_ms": median(waits),
        "wait_p95_ms": percentile(waits, 0.95),
    }


def render(report: dict[str, Any]) -> str:
    swap, burst_, mixed_ = report["swap"], report["burst"], report["mixed"]
    lines = [
        f"swap (evict one tiny model, load the other, first token), {swap['swaps']} swaps: "
        f"p50 {swap['p50_ms']:.0f} ms, p95 {swap['p95_ms']:.0f} ms, max {swap['max_ms']:.0f} ms",
        "burst of 60 to one model (2 slots, 32 tokens each), queue wait by priority:",
    ]
    for priority in PRIORITIES:
        b = burst_[priority]
        lines.append(
            f"  {priority:<6} p50 {b['p50_ms']:7.1f} ms  p95 {b['p95_ms']:7.1f} ms  "
            f"max {b['max_ms']:7.1f} ms"
        )
    lines.append(
        f"  first LOW finished {burst_['first_low_done_at']}th of 60; "
        f"last HIGH finished {burst_['last_high_done_at']}th"
    )
    lines.append(
        f"mixed: 40 requests alternating between two models with room for one: "
        f"{mixed_['loads']} loads, {mixed_['total_s']:.2f} s in all, queue+load wait "
        f"p50 {mixed_['wait_p50_ms']:.0f} ms, p95 {mixed_['wait_p95_ms']:.0f} ms"
    )
    return "\n".join(lines)


async def measure(port: int, swap_count: int) -> dict[str, Any]:
    async with RouterClient(f"127.0.0.1:{port}") as client:
        await client.wait_ready(20)
        return {
            "swap": await swaps(client, swap_count),
            "burst": await burst(client),
            "mixed": await mixed(client),
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scheduling", description=__doc__)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "scheduling.json")
    args = parser.parse_args(argv)
    model = ensure_model(CACHE / "models", "tiny-chat", variant="chat")
    params = {"model_path": str(model), "params": {"n_ctx": 4096}}
    with tempfile.TemporaryDirectory(prefix="routermodel-bench-sched-") as directory:
        port = free_port()
        config = write_config(
            Path(directory),
            {"a": params, "b": params},
            grpc_port=port,
            system={
                "cpu_threads": 1,
                "parallel_requests": 2,
                "max_concurrent_models": 1,
                "swap_batch_limit": 4,
                "max_queue_size_per_model": 100,
                "enable_idle_timeout": False,
                "stop_grace_sec": 2,
                "state_dir": str(Path(directory) / "state"),
            },
        )
        with router_process(config, port):
            report = asyncio.run(measure(port, args.swaps))
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
