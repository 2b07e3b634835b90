"""A bounded soak: mixed OpenAI and admin traffic, random disconnects, two models swapping.

`soak()` drives a running facade (router behind it) from a few concurrent clients for a fixed
time and returns a `Ledger`: every request with its outcome, the disconnects, the errors by
class, and /proc samples of the router and facade. Outcomes:

* completed - a 2xx answer read to its end (a stream up to `data: [DONE]`, no error frame);
* cancelled - the client left on purpose, mid-stream or while waiting;
* error     - a clean error: OpenAI's envelope (HTTP status or SSE frame) disclosing nothing;
* unclean   - anything else (a 500, a hang past the timeout, a torn connection, a bad body).

The router keeps its own count of the inference requests it finished, by endpoint and status
class (`routermodel_requests_total`); `Ledger.reconcile` holds it against the clients' ledger,
so a request the router lost or counted twice (e.g. a handler left unfinished) shows. `quiesce`
checks, before anything is unloaded, that no slot stays busy and no waiter stays queued.

Each client draws its schedule from its own seeded `random.Random`, so the mix is the same run
to run (the timings are not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.disclosure import disclosures
from tests.procfs import open_fds, rss_bytes

__all__ = [
    "Ledger",
    "Sample",
    "canonical_fds",
    "quiesce",
    "router_requests",
    "settle",
    "soak",
]

CHAT, EMBED = "chat", "embed"
ALIASES = (CHAT, EMBED)
PROMPTS = ("hello there", "the cat sat on the mat", "tell me a story", "one two three four")
TEXTS = ("alpha", "the quick brown fox", "router soak test", "embedding input text")
# Kind -> weight in the mix.
MIX: dict[str, int] = {
    "chat": 20,
    "chat_stream": 20,
    "embeddings": 25,
    "list": 6,
    "status": 6,
    "queue_stats": 5,
    "load": 4,
    "unload": 3,
}
# Chance that a client leaves a chat or embeddings request before its end.
DISCONNECT_RATE = 0.2
REQUEST_TIMEOUT_SEC = 60.0
MIB = 1024 * 1024
# Client kind -> the router endpoint (label of routermodel_requests_total) it calls.
ENDPOINTS = {"chat": "chat", "chat_stream": "chat", "embeddings": "embeddings"}

Outcome = tuple[str, str]  # ("completed" | "cancelled" | "error" | "unclean", detail)


@dataclass(frozen=True)
class Sample:
    """One /proc reading, `at` seconds into the soak."""

    at: float
    rss: dict[str, int]
    fds: dict[str, int]


@dataclass
class Ledger:
    """What the soak did and saw."""

    duration_sec: float
    started: int = 0
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    errors: Counter[str] = field(default_factory=Counter)  # "503 model_unloaded", ...
    disconnects: Counter[str] = field(default_factory=Counter)  # "mid-stream", "waiting"
    unclean: list[str] = field(default_factory=list)
    loads: Counter[str] = field(default_factory=Counter)  # alias -> times it became ready
    samples: list[Sample] = field(default_factory=list)
    fds_before: dict[str, int] = field(default_factory=dict)
    fds_after: dict[str, int] = field(default_factory=dict)
    # The router's own count over the run: (endpoint, "2xx" | "4xx" | "5xx" | "cancelled").
    router: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def accounted(self) -> int:
        """Requests with a recorded outcome (the client side of the ledger)."""
        return sum(self.requests.values())

    def reconcile(self) -> list[str]:
        """Where the router's count of inference requests disagrees with the clients'.

        A request a client left may have ended any way at the router, or never reached it;
        every other one reached it and ended there as the client saw it. So per endpoint:
        router successes and errors are the clients' plus at most the ones left, router
        cancellations at most the ones left, and the router's total lies between the clients'
        total less the ones left and the clients' total.
        """
        problems = []
        for endpoint in sorted(set(ENDPOINTS.values())):
            client: Counter[str] = Counter()
            for (kind, outcome), count in self.requests.items():
                if ENDPOINTS.get(kind) == endpoint:
                    client[outcome] += count
            router = Counter({s: n for (e, s), n in self.router.items() if e == endpoint})
            left = client["cancelled"]
            ok, cancelled = router["2xx"], router["cancelled"]
            errors = router["4xx"] + router["5xx"]
            total, client_total = ok + errors + cancelled, sum(client.values())
            for what, low, value, high in (
                ("successes", client["completed"], ok, client["completed"] + left),
                ("errors", client["error"], errors, client["error"] + left),
                ("cancellations", 0, cancelled, left),
                ("requests", client_total - left, total, client_total),
            ):
                if not low <= value <= high:
                    problems.append(
                        f"{endpoint}: router {what} {value} not in [{low}, {high}]"
                        f" (clients {dict(client)}, router {dict(router)})"
                    )
        return problems

    def window_rss(self, name: str, start: float, end: float) -> float:
        """Median RSS of process `name` over the samples taken in [start, end) seconds."""
        values = [s.rss[name] for s in self.samples if start <= s.at < end]
        assert values, f"no samples in [{start}, {end})"
        return float(statistics.median(values))

    def report(self, window_sec: float) -> str:
        kinds = sorted({kind for kind, _ in self.requests})
        lines = [
            f"soak ledger: {self.duration_sec:.0f} s, {self.started} requests "
            f"({self.started / self.duration_sec:.1f}/s), {self.accounted} accounted for",
        ]
        for kind in kinds:
            outcomes = {o: c for (k, o), c in sorted(self.requests.items()) if k == kind}
            lines.append(f"  {kind:<12} {sum(outcomes.values()):>6}  {outcomes}")
        lines.append(f"  disconnects  {sum(self.disconnects.values())}  {dict(self.disconnects)}")
        lines.append(
            f"  errors       {sum(self.errors.values())}  {dict(sorted(self.errors.items()))}"
        )
        lines.append(f"  unclean      {len(self.unclean)}  {self.unclean[:5]}")
        lines.append(f"  model loads  {dict(self.loads)}")
        lines.append(f"  router count {dict(sorted(self.router.items()))}")
        second = (window_sec, 2 * window_sec)
        last = (self.duration_sec - window_sec, self.duration_sec + 1)
        for name in sorted(self.fds_before):
            lines.append(
                f"  {name:<7} fds {self.fds_before[name]} -> {self.fds_after.get(name)};"
                f" rss {self.window_rss(name, *second) / MIB:.1f} MiB (2nd window) ->"
                f" {self.window_rss(name, *last) / MIB:.1f} MiB (last window),"
                f" max {max(s.rss[name] for s in self.samples) / MIB:.1f} MiB"
            )
        return "\n".join(lines)


class _Client:
    """One simulated caller: a session of its own and a seeded schedule."""

    def __init__(self, base_url: str, seed: int, ledger: Ledger) -> None:
        self.base_url = base_url
        self.rng = random.Random(seed)
        self.ledger = ledger

    async def run(self, until: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SEC)
        async with aiohttp.ClientSession(self.base_url, timeout=timeout) as session:
            while time.monotonic() < until:
                kind = self.rng.choices(kinds, weights)[0]
                self.ledger.started += 1
                self._record(kind, await self._outcome(getattr(self, f"_{kind}")(session)))
                await asyncio.sleep(self.rng.uniform(0, 0.02))

    async def _outcome(self, call: Awaitable[Outcome]) -> Outcome:
        try:
            return await asyncio.wait_for(call, REQUEST_TIMEOUT_SEC)
        except asyncio.TimeoutError:
            return ("unclean", "no answer within the request timeout")
        except (aiohttp.ClientError, json.JSONDecodeError, ConnectionError) as error:
            return ("unclean", f"{type(error).__name__}: {error}")

    def _record(self, kind: str, outcome: Outcome) -> None:
        state, detail = outcome
        self.ledger.requests[(kind, state)] += 1
        if state == "error":
            self.ledger.errors[detail] += 1
        elif state == "cancelled":
            self.ledger.disconnects[detail] += 1
        elif state == "unclean":
            self.ledger.unclean.append(f"{kind}: {detail}")

    # The kinds of request

    def _chat_body(self, leave: bool, stream: bool) -> dict[str, Any]:
        return {
            "model": CHAT,
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            # One that will be left gets long enough to be left mid-way.
            "max_tokens": self.rng.randint(150, 300) if leave else self.rng.randint(1, 24),
            "stream": stream,
        }

    async def _chat(self, session: aiohttp.ClientSession) -> Outcome:
        leave = self.rng.random() < DISCONNECT_RATE
        patience = self.rng.uniform(0.01, 0.3) if leave else None
        body = self._chat_body(leave, stream=False)
        call = _json(session, "POST", "/v1/chat/completions", body, "chat.completion")
        return await _leave_after(patience, call)

    async def _chat_stream(self, session: aiohttp.ClientSession) -> Outcome:
        leave = self.rng.random() < DISCONNECT_RATE
        leave_after = self.rng.randint(1, 6) if leave else None
        body = self._chat_body(leave, stream=True)
        return await _stream(session, "/v1/chat/completions", body, leave_after)

    async def _embeddings(self, session: aiohttp.ClientSession) -> Outcome:
        inputs = [self.rng.choice(TEXTS) for _ in range(self.rng.randint(1, 8))]
        call = _json(session, "POST", "/v1/embeddings", {"model": EMBED, "input": inputs}, "list")
        patience = self.rng.uniform(0.01, 0.2) if self.rng.random() < DISCONNECT_RATE else None
        return await _leave_after(patience, call)

    async def _list(self, session: aiohttp.ClientSession) -> Outcome:
        return await _json(session, "GET", "/v1/models/status", None, None)

    async def _status(self, session: aiohttp.ClientSession) -> Outcome:
        alias = self.rng.choice(ALIASES)
        return await _json(session, "GET", f"/v1/models/status/{alias}", None, None)

    async def _queue_stats(self, session: aiohttp.ClientSession) -> Outcome:
        return await _json(session, "GET", "/v1/queue/stats", None, None)

    async def _load(self, session: aiohttp.ClientSession) -> Outcome:
        alias = self.rng.choice(ALIASES)
        body = {"wait": self.rng.random() < 0.5, "timeout_sec": 30}
        return await _json(session, "POST", f"/v1/models/{alias}/load", body, None)

    async def _unload(self, session: aiohttp.ClientSession) -> Outcome:
        alias = self.rng.choice(ALIASES)
        body = {"force": self.rng.random() < 0.2, "drain_timeout_sec": 2}
        return await _json(session, "POST", f"/v1/models/{alias}/unload", body, None)


async def _leave_after(patience: float | None, call: Awaitable[Outcome]) -> Outcome:
    """Run `call`, leaving (closing its connection) after `patience` seconds if it is not done."""
    if patience is None:
        return await call
    try:
        return await asyncio.wait_for(call, patience)
    except asyncio.TimeoutError:
        return ("cancelled", "waiting")


async def _json(
    session: aiohttp.ClientSession, method: str, path: str, body: Any, expect_object: str | None
) -> Outcome:
    async with session.request(method, path, json=body) as response:
        text = await response.text()
        if response.status >= 400:
            return _error(response.status, text, path)
        answer = json.loads(text)
        if expect_object is not None and answer.get("object") != expect_object:
            return ("unclean", f"{path}: unexpected body {text[:200]}")
        return ("completed", "")


async def _stream(
    session: aiohttp.ClientSession, path: str, body: Any, leave_after: int | None
) -> Outcome:
    async with session.post(path, json=body) as response:
        if response.status >= 400:
            return _error(response.status, await response.text(), path)
        frames, error = 0, None
        async for line in response.content:
            if line == b"data: [DONE]\n":
                if error is not None:
                    return error
                return ("completed", "") if frames else ("unclean", "a stream with no chunk")
            if not line.startswith(b"data: "):
                continue
            payload = json.loads(line[len(b"data: ") :])
            if "error" in payload:
                error = _error(0, line[len(b"data: ") :].decode(), path)
                continue
            frames += 1
            if leave_after is not None and frames >= leave_after:
                response.close()
                return ("cancelled", "mid-stream")
        return ("unclean", "a stream that ended without [DONE]")


def _error(status: int, text: str, path: str) -> Outcome:
    """A clean error is OpenAI's envelope disclosing nothing; its class is status and code."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return ("unclean", f"{status} not an error envelope: {text[:200]}")
    if set(error) != {"message", "type", "param", "code"}:
        return ("unclean", f"{status} malformed envelope: {text[:200]}")
    if status >= 500 and status not in (503, 504):
        return ("unclean", f"{status} {error['type']}: {error['message']}")
    leaked = disclosures(text, echo=path)
    if leaked:
        return ("unclean", f"{status} discloses {leaked}")
    where = "sse" if status == 0 else str(status)
    return ("error", f"{where} {error['code'] or error['type']}")


async def _watch(base_url: str, ledger: Ledger) -> None:
    """Count the loads (transitions to READY) the status stream reports, per model."""
    ready: dict[str, bool] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(base_url, timeout=timeout) as session:
        async with session.get("/v1/models/status/stream") as response:
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[len(b"data: ") :])
                # The seed's payloads: full_status keys its models by alias, model_update is one.
                models = event.get("models")
                for model in models.values() if isinstance(models, dict) else [event]:
                    alias, state = model.get("alias"), model.get("state")
                    if alias is None or state is None:
                        continue
                    is_ready = state == "ready"
                    if is_ready and not ready.get(alias, False):
                        ledger.loads[alias] += 1
                    ready[alias] = is_ready


async def _sample(pids: dict[str, int], started: float, ledger: Ledger) -> None:
    while True:
        ledger.samples.append(
            Sample(
                at=time.monotonic() - started,
                rss={name: rss_bytes(pid) for name, pid in pids.items()},
                fds={name: open_fds(pid) for name, pid in pids.items()},
            )
        )
        await asyncio.sleep(0.5)


async def soak(
    base_url: str, pids: dict[str, int], duration_sec: float, *, clients: int, seed: int
) -> Ledger:
    """Drive the facade at `base_url` for `duration_sec`; `pids` names the processes to sample."""
    ledger = Ledger(duration_sec)
    started = time.monotonic()
    background = [
        asyncio.create_task(_watch(base_url, ledger)),
        asyncio.create_task(_sample(pids, started, ledger)),
    ]
    try:
        until = started + duration_sec
        await asyncio.gather(
            *(_Client(base_url, seed + index, ledger).run(until) for index in range(clients))
        )
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ledger


async def quiesce(base_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Wait, unloading nothing, until no slot is busy and no waiter queued; the queue stats.

    Run right after the clients stop: a request left by its client frees its slot or its place
    in the queue as soon as the router sees the cancel, so whatever stays busy here leaked.
    (`settle` unloads every model, which would free them anyway.)
    """
    deadline = time.monotonic() + timeout
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(base_url, timeout=limit) as session:
        while True:
            async with session.get("/v1/queue/stats") as response:
                stats: dict[str, Any] = await response.json()
            async with session.get("/v1/models/status") as response:
                models = (await response.json())["models"]
            busy = [
                (m["alias"], m["in_flight"], m["queued"])
                for m in models
                if m["in_flight"] or m["queued"]
            ]
            summary = stats["summary"]
            if not busy and summary["total_queued"] == summary["total_processing"] == 0:
                return stats
            assert time.monotonic() < deadline, (
                f"busy {timeout} s after the clients: {busy} {stats}"
            )
            await asyncio.sleep(0.1)


async def router_requests(metrics_url: str) -> Counter[tuple[str, str]]:
    """The router's count of finished inference requests: (endpoint, status class) -> n."""
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "routermodel_requests_total":
                counts[(sample.labels["endpoint"], sample.labels["status"])] += int(sample.value)
    return counts


async def settle(base_url: str, timeout: float = 30.0) -> dict[str, Any]:
    """Unload every model and wait until nothing runs or waits; returns the queue stats."""
    deadline = time.monotonic() + timeout
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(base_url, timeout=limit) as session:
        for alias in ALIASES:
            async with session.post(f"/v1/models/{alias}/unload", json={"force": True}) as answer:
                assert answer.status == 200, await answer.text()
        while True:
            async with session.get("/v1/queue/stats") as response:
                stats: dict[str, Any] = await response.json()
            async with session.get("/v1/models/status") as response:
                models = (await response.json())["models"]
            summary = stats["summary"]
            idle = summary["total_queued"] == 0 and summary["total_processing"] == 0
            idle = idle and all(
                m["in_flight"] == 0 and m["queued"] == 0 and m["state"] == "MODEL_STATE_STOPPED"
                for m in models
            )
            if idle:
                return stats
            assert time.monotonic() < deadline, f"not idle within {timeout} s: {stats} {models}"
            await asyncio.sleep(0.1)


async def canonical_fds(pids: dict[str, int], quiet_sec: float = 1.0) -> dict[str, int]:
    """Open fds of each process once no client is connected (after `settle`, sessions closed)."""
    await asyncio.sleep(quiet_sec)  # closed client connections reach the servers
    return {name: open_fds(pid) for name, pid in pids.items()}
