"""`python -m tests.bench`: (a) llama-server alone, (b) the router, (c) router + facade, (p) a peer.

One tiny chat model, one llama-server configuration (`-np 8 -c 8192 -t 1`, unified KV cache:
the router's own argv for that model is reused for the direct server), loopback only. A
separate load-generator process (`tests.bench.loadgen`) drives every run; runs are interleaved
(each round runs every target once per workload, starting with the next target each time) and
each figure is the median over the rounds.
CPU per 1,000 streamed tokens is read from /proc/<pid>/stat (utime + stime) of the router and
facade processes themselves, not their children.

On a shared machine, a run during which other processes used the CPU is measured again (see
FOREIGN_CORES_LIMIT); the report says how often that happened and the load average.

A second router + facade pair, target (d), measures a variant next to (c), interleaved with
it: `--tracing` exports every span over OTLP/gRPC to a receiver in this process (the cost of
tracing); `--compare JSON` merges JSON into the pair's config (e.g. another
`system.stream_pacing_ms`).

Target (p), left out with `--no-peer`, is the kind of peer the issue's reference figures came
from: a single-hop aiohttp proxy (`tests.bench.proxy`), measured in the same rounds, in front of
its own llama-server with (a)'s argv (so that its idle keep-alive connections cannot hold the
HTTP threads of (a)'s server). It has no (iv): it loads nothing.

Usage: `python -m tests.bench [--rounds N] [--workloads i,ii,iii,iv] [--out PATH]
[--tracing | --compare JSON] [--no-peer]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from clients import RouterClient
from router.config import load_settings
from router.embedded.demo import ensure_model
from router.pool.command import build_command
from router.pool.pool import launch_spec
from tests.helpers import CACHE, PYTHON, REPO, free_port

MODEL = "tiny-chat"
SLOTS = 8
TARGET_NAMES = {
    "a": "llama-server",
    "b": "router gRPC",
    "c": "router+facade",
    "d": "(c) variant",
    "p": "aiohttp proxy",
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The machine may be shared: a run during which processes other than the bench's used more
# than this many cores on average is measured again, a few times at most (and at most
# FOREIGN_RETRY_BUDGET times in all, so that a busy machine cannot stretch the bench much).
FOREIGN_CORES_LIMIT = 0.15
FOREIGN_RETRIES = 4
FOREIGN_RETRY_BUDGET = 40
# Before each run, wait (in windows of QUIET_WINDOW_SEC, at most QUIET_WAIT_BUDGET_SEC over the
# whole bench) until other processes leave the CPU alone.
QUIET_WINDOW_SEC = 0.5
QUIET_WAIT_BUDGET_SEC = 90.0
# Between an unload and the cold request: let the stopped child's exit settle.
_COLD_SETTLE_SEC = 0.3


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    stream: bool
    max_tokens: int
    concurrency: int
    requests: int


WORKLOADS = (
    Workload("i", "stream, max_tokens 128, concurrency 1, 40 requests", True, 128, 1, 40),
    Workload("ii", "stream, max_tokens 128, concurrency 8, 160 requests", True, 128, 8, 160),
    Workload("iii", "non-stream, max_tokens 1, concurrency 16, 400 requests", False, 1, 16, 400),
)
COLD = Workload(
    "iv", "cold: first request to an unloaded model (request -> first token)", True, 128, 1, 1
)
# Not measured: first requests of each path, and of a child the cold runs just started.
WARM_UP = Workload("warm", "warm-up", True, 32, 4, 16)


# ---- processes -----------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float, float]:
    """(parent PID, own CPU seconds, CPU seconds of its reaped children) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    own = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return int(fields[1]), own, (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU seconds all processors spent busy since boot (/proc/stat minus idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and every process below it, reaped ones included."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats[int(entry.name)] = _proc_stat(int(entry.name))
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        _, own, reaped = stats.get(pid, (0, 0.0, 0.0))
        total += own + reaped
        todo.extend(children.get(pid, ()))
    return total


@dataclass
class Process:
    """A server process started by the bench, its output in a log file, stopped by PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """utime + stime of this process (all its threads, none of its children)."""
        return _proc_stat(self.pid)[1]

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}: see {self.log.name}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


class Processes:
    """Every process the bench starts; `stop_all` reaps them in reverse order."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._started: list[Process] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> Process:
        log = open(self._logs / f"{name}.log", "wb")  # closed by Process.stop
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=log,
            )
        except BaseException:
            log.close()
            raise
        process = Process(name, popen, log)
        self._started.append(process)
        return process

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


def wait_http(url: str, process: Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check()
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {timeout} s")


# ---- the load generator --------------------------------------------------------------------


class LoadGen:
    """The load-generator process, spoken to in JSON lines."""

    def __init__(self, process: Process) -> None:
        self.process = process

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.process.popen.stdin, self.process.popen.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(command).encode() + b"\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            self.process.check()
            raise RuntimeError("the load generator stopped answering")
        result: dict[str, Any] = json.loads(line)
        return result

    def quit(self) -> None:
        stdin = self.process.popen.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(b'{"op": "quit"}\n')
                stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.popen.wait(10)


# ---- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def summarize(result: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    """One run's figures: throughput, latency percentiles (ms) and CPU per unit of work."""
    samples = result["samples"]
    wall = result["wall"]
    tokens = sum(s[3] for s in samples)
    ttfts = [s[1] * 1000 for s in samples if s[1] is not None]
    e2es = [s[2] * 1000 for s in samples]
    run: dict[str, Any] = {
        "requests": len(samples),
        "errors": len(result["errors"]),
        "wall_s": wall,
        "tokens": tokens,
        "content_chunks": sum(s[4] for s in samples),
        "messages": sum(s[5] for s in samples),
        "tok_s": tokens / wall if wall else 0.0,
        "req_s": len(samples) / wall if wall else 0.0,
        "ttft_p50_ms": percentile(ttfts, 0.5),
        "ttft_p99_ms": percentile(ttfts, 0.99),
        "e2e_p50_ms": percentile(e2es, 0.5),
        "e2e_p99_ms": percentile(e2es, 0.99),
        "server_p50_ms": percentile([s[6] for s in samples], 0.5),
    }
    for name, seconds in cpu.items():
        run[f"{name}_cpu_s"] = seconds
        run[f"{name}_cpu_s_per_1k_tokens"] = seconds / tokens * 1000 if tokens else None
        run[f"{name}_cpu_ms_per_request"] = seconds / len(samples) * 1000 if samples else None
    return run


# ---- the bench -----------------------------------------------------------------------------


class SpanSink:
    """An OTLP/gRPC trace receiver that only counts what it is sent (no parsing: its CPU is a
    collector's, not the router's)."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.exports += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse

    def stop(self) -> None:
        self._server.stop(None)


@dataclass
class Stack:
    """One router + facade pair (with its own config, ports and state directory)."""

    router: Process
    facade: Process
    grpc_port: int
    http_port: int


@dataclass
class Bench:
    workdir: Path
    procs: Processes
    tracing: bool = False
    compare: dict[str, Any] | None = None  # config merged into the (d) pair
    direct_argv: list[str] = field(default_factory=list)
    direct_port: int = 0
    key: str = ""
    direct: Process | None = None
    stacks: dict[str, Stack] = field(default_factory=dict)  # target "b"/"c" and "d" -> its pair
    sink: SpanSink | None = None
    loadgen: LoadGen | None = None
    peer: bool = False
    proxy: Process | None = None
    proxy_llama: Process | None = None
    proxy_port: int = 0
    retries: int = 0
    quiet_wait: float = 0.0
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        stacks = ("b", "c", "d") if "d" in self.stacks else ("b", "c")
        return ("a", *stacks, *(("p",) if self.proxy is not None else ()))

    def _stack_for(self, target: str) -> Stack:
        return self.stacks["d" if target == "d" else "c"]

    def _write_config(
        self, name: str, overrides: dict[str, Any] | None = None
    ) -> tuple[Path, int, int]:
        model = ensure_model(CACHE / "models", MODEL, variant="chat")
        grpc_port, http_port = free_port(), free_port()
        config: dict[str, Any] = {
            "grpc": {"host": "127.0.0.1", "port": grpc_port, "grace_sec": 2},
            "api": {"host": "127.0.0.1", "port": http_port},
            "system": {
                "cpu_threads": 1,
                "parallel_requests": SLOTS,
                "enable_idle_timeout": False,
                "max_queue_size_per_model": 1000,
                "stop_grace_sec": 2,
                "state_dir": str(self.workdir / f"state-{name}"),
            },
            "models": {MODEL: {"model_path": str(model), "params": {"n_ctx": 8192}}},
        }
        for section, values in (overrides or {}).items():
            config[section] = {**config.get(section, {}), **values}
        config_path = self.workdir / f"config-{name}.json"
        config_path.write_text(json.dumps(config, indent=2))
        return config_path, grpc_port, http_port

    def _start_stack(self, name: str, overrides: dict[str, Any] | None = None) -> Stack:
        config_path, grpc_port, http_port = self._write_config(name, overrides)
        config = ["-c", str(config_path)]
        router = self.procs.start(f"router-{name}", [PYTHON, "-m", "router", *config])
        facade = self.procs.start(f"facade-{name}", [PYTHON, "-m", "facade", *config])
        return Stack(router, facade, grpc_port, http_port)

    def setup(self) -> None:
        self.start_direct()
        self.stacks["c"] = self._start_stack("plain")
        if self.tracing:
            self.sink = SpanSink()
            traced = {"telemetry": {"otlp_endpoint": f"http://127.0.0.1:{self.sink.port}"}}
            self.stacks["d"] = self._start_stack("traced", traced)
        elif self.compare is not None:
            self.stacks["d"] = self._start_stack("variant", self.compare)
        if self.peer:
            self.start_peer()
        for stack in self.stacks.values():
            wait_http(f"http://127.0.0.1:{stack.http_port}/health", stack.facade)
            asyncio.run(self._admin(stack, "load"))
        self.start_loadgen()

    def start_direct(self) -> None:
        """Start (a), the llama-server alone, and wait for it to answer."""
        config_path, _, _ = self._write_config("plain")
        settings = load_settings(config_path, env={})
        self.direct_port = free_port()
        # The direct server runs the exact argv the router builds for its child.
        self.key = secrets.token_hex(16)
        key_file = self.workdir / "direct.key"
        key_file.write_text(self.key + "\n")
        key_file.chmod(0o600)
        spec = launch_spec(MODEL, settings.models[MODEL], settings)
        self.direct_argv = build_command(spec, port=self.direct_port, api_key_file=key_file)
        print("llama-server argv:", " ".join(self.direct_argv[3:]), flush=True)

        self.direct = direct = self.procs.start("direct", self.direct_argv)
        wait_http(f"http://127.0.0.1:{self.direct_port}/health", direct)

    def start_peer(self) -> None:
        """Start (p): the proxy and its own llama-server, and wait for both to answer."""
        llama_port, self.proxy_port = free_port(), free_port()
        argv = [*self.direct_argv]
        argv[argv.index("--port") + 1] = str(llama_port)
        self.proxy_llama = llama = self.procs.start("proxy-llama", argv)
        wait_http(f"http://127.0.0.1:{llama_port}/health", llama)
        upstream = f"http://127.0.0.1:{llama_port}"
        argv = [PYTHON, "-m", "tests.bench.proxy", str(self.proxy_port), upstream]
        self.proxy = self.procs.start("proxy", argv)
        wait_http(f"http://127.0.0.1:{self.proxy_port}/health", self.proxy)

    def start_loadgen(self) -> None:
        self.loadgen = LoadGen(
            self.procs.start(
                "loadgen",
                [PYTHON, "-m", "tests.bench.loadgen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )

    async def _admin(self, stack: Stack, action: str) -> None:
        async with RouterClient(f"127.0.0.1:{stack.grpc_port}") as client:
            await client.wait_ready(20)
            if action == "load":
                await client.load(MODEL, timeout=30)
            else:
                await client.unload(MODEL, force=True)

    def command(self, target: str, workload: Workload) -> dict[str, Any]:
        base: dict[str, Any] = {
            "op": "run",
            "stream": workload.stream,
            "max_tokens": workload.max_tokens,
            "concurrency": workload.concurrency,
            "requests": workload.requests,
        }
        if target == "a":
            headers = _bearer(self.key)
            if workload.stream:  # llama-server closes every streamed connection anyway
                headers["Connection"] = "close"
            url = f"http://127.0.0.1:{self.direct_port}/v1/chat/completions"
            # At most one request per slot in flight, as the router sends them: llama-server
            # serves each keep-alive connection on one HTTP thread (it has slots + 2), so more
            # connections than that can stall for its 5 s keep-alive timeout (seen: 400
            # requests in 5.2 s instead of 0.2 s). Requests beyond the slots would only queue
            # inside llama-server anyway.
            return {**base, "via": "http", "target": url, "headers": headers, "in_flight": SLOTS}
        if target == "p":
            url = f"http://127.0.0.1:{self.proxy_port}/v1/chat/completions"
            return {**base, "via": "http", "target": url, "headers": _bearer(self.key)}
        stack = self._stack_for(target)
        if target == "b":
            return {**base, "via": "grpc", "target": f"127.0.0.1:{stack.grpc_port}"}
        url = f"http://127.0.0.1:{stack.http_port}/v1/chat/completions"
        return {**base, "via": "http", "target": url}

    def measure(self, target: str, workload: Workload) -> dict[str, Any]:
        return self._clean(lambda: self._measure_once(target, workload))

    def _wait_quiet(self) -> None:
        while self.quiet_wait < QUIET_WAIT_BUDGET_SEC:
            system_before, ours_before = system_busy_seconds(), tree_cpu_seconds(os.getpid())
            time.sleep(QUIET_WINDOW_SEC)
            self.quiet_wait += QUIET_WINDOW_SEC
            busy = system_busy_seconds() - system_before
            foreign = busy - (tree_cpu_seconds(os.getpid()) - ours_before)
            if foreign / QUIET_WINDOW_SEC <= FOREIGN_CORES_LIMIT:
                return

    def _clean(self, once: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `once` again (a few times at most) while other work took the CPU meanwhile."""
        for _ in range(FOREIGN_RETRIES + 1):
            self._wait_quiet()
            system_before, ours_before = system_busy_seconds(), tree_cpu_seconds(os.getpid())
            started = time.monotonic()
            run = once()
            elapsed = time.monotonic() - started
            busy = system_busy_seconds() - system_before
            foreign = busy - (tree_cpu_seconds(os.getpid()) - ours_before)
            run["foreign_cores"] = max(0.0, foreign / elapsed)
            run["busy_cores"] = busy / elapsed
            if run["foreign_cores"] <= FOREIGN_CORES_LIMIT or self.retries >= FOREIGN_RETRY_BUDGET:
                break
            self.retries += 1
        return run

    def _llama_cpu_seconds(self, target: str) -> float:
        """CPU seconds of the llama-server serving `target` (the router's child for b-d)."""
        assert self.direct is not None
        if target == "a":
            return self.direct.cpu_seconds()
        if target == "p":
            assert self.proxy_llama is not None
            return self.proxy_llama.cpu_seconds()
        router = self._stack_for(target).router
        return tree_cpu_seconds(router.pid) - router.cpu_seconds()

    def _measure_once(self, target: str, workload: Workload) -> dict[str, Any]:
        assert self.loadgen is not None
        watched = {"loadgen": self.loadgen.process}
        if target == "p":
            assert self.proxy is not None
            watched["proxy"] = self.proxy
        elif target != "a":
            stack = self._stack_for(target)
            watched["router"] = stack.router
            if target != "b":
                watched["facade"] = stack.facade
        before = {name: p.cpu_seconds() for name, p in watched.items()}
        llama_before = self._llama_cpu_seconds(target)
        result = self.loadgen.call(self.command(target, workload))
        cpu = {name: p.cpu_seconds() - before[name] for name, p in watched.items()}
        cpu["llama"] = self._llama_cpu_seconds(target) - llama_before
        for error in result["errors"][:3]:
            print(f"  ! ({target}) {workload.key}: {error}", file=sys.stderr)
        return summarize(result, cpu)

    def cold(self, target: str) -> dict[str, Any]:
        return self._clean(lambda: self._cold_once(target))

    def _cold_once(self, target: str) -> dict[str, Any]:
        assert self.loadgen is not None
        if target == "a":
            port = free_port()
            argv = [*self.direct_argv]
            argv[argv.index("--port") + 1] = str(port)
            result = self.loadgen.call(
                {
                    "op": "cold",
                    "argv": argv,
                    "url": f"http://127.0.0.1:{port}",
                    "headers": {"Authorization": f"Bearer {self.key}"},
                }
            )
            if "error" in result:
                raise RuntimeError(f"cold start of llama-server failed: {result['error']}")
            return {
                "ttft_p50_ms": result["ttft"] * 1000,
                "e2e_p50_ms": result["e2e"] * 1000,
                "ready_ms": result["ready"] * 1000,
                "tokens": result["tokens"],
            }
        asyncio.run(self._admin(self._stack_for(target), "unload"))
        time.sleep(_COLD_SETTLE_SEC)
        run = self._measure_once(target, COLD)
        if run["requests"] != 1:
            raise RuntimeError(f"cold request through ({target}) failed")
        return run

    def record(self, workload: str, target: str, run: dict[str, Any]) -> None:
        self.runs.setdefault(workload, {}).setdefault(target, []).append(run)

    def warm_up(self) -> None:
        for target in self.targets:
            self._measure_once(target, WARM_UP)

    def round(self, number: int, rounds: int, selected: Sequence[str]) -> None:
        started = time.monotonic()
        # Each round starts with another target, so that none always runs first or last: the
        # machine's speed drifts within a round too, and with a fixed order that drift can
        # pass for a difference between targets (in one run, (d) with the same config as (c)
        # came out 2-12 % apart from it, paired).
        shift = (number - 1) % len(self.targets)
        order = self.targets[shift:] + self.targets[:shift]
        for workload in WORKLOADS:
            if workload.key in selected:
                for target in order:
                    self.record(workload.key, target, self.measure(target, workload))
        if COLD.key in selected:
            for target in (t for t in order if t != "p"):
                self.record(COLD.key, target, self.cold(target))
            # The cold requests reloaded the models: warm the fresh children before the next round.
            self._measure_once("b", WARM_UP)
            if "d" in self.stacks:
                self._measure_once("d", WARM_UP)
        print(f"round {number}/{rounds} done in {time.monotonic() - started:.1f} s", flush=True)


# ---- report --------------------------------------------------------------------------------


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float))}
    out: dict[str, Any] = {}
    for key in sorted(keys):
        values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
        out[key] = median(values)
    out["errors"] = sum(run.get("errors", 0) for run in runs)
    return out


def build_report(bench: Bench, meta: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload in (*WORKLOADS, COLD):
        per_target: dict[str, Any] = {}
        runs = bench.runs.get(workload.key)
        if runs is None:
            continue
        for target in TARGET_NAMES:
            if target not in runs:
                continue
            per_target[target] = {"median": medians(runs[target]), "runs": runs[target]}
        base = per_target.get("a", {}).get("median", {})
        for entry in per_target.values():
            m = entry["median"]
            paired = _paired_ratios(entry["runs"], runs.get("a", []))
            entry["vs_a"] = {
                "tok_s_ratio": _ratio(m.get("tok_s"), base.get("tok_s")),
                "tok_s_ratio_paired": median(paired) if paired else None,
                "tok_s_ratio_paired_range": [min(paired), max(paired)] if paired else None,
                "req_s_ratio": _ratio(m.get("req_s"), base.get("req_s")),
                "ttft_p50_delta_ms": _delta(m.get("ttft_p50_ms"), base.get("ttft_p50_ms")),
            }
        results[workload.key] = {"title": workload.title, "targets": per_target}
    return {"meta": meta, "results": results}


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _paired_ratios(runs: list[dict[str, Any]], direct: list[dict[str, Any]]) -> list[float]:
    """Each round's tok/s ratio to (a) in the same round.

    The machine's speed drifts (a shared VM: (a) alone has varied by 30% between rounds);
    runs of one round are seconds apart, so their ratio cancels most of that drift.
    """
    return [
        ratio
        for run, base in zip(runs, direct, strict=True)
        if (ratio := _ratio(run.get("tok_s"), base.get("tok_s"))) is not None
    ]


def _range(bounds: list[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.2f}–{bounds[1]:.2f}"


def _delta(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) + suffix


def render(report: dict[str, Any]) -> str:
    head = (
        f"{'workload':<5} {'path':<17} {'tok/s':>7} {'req/s':>7} {'TTFT50':>8} {'TTFT99':>8} "
        f"{'e2e50':>8} {'e2e99':>8} {'×tok/s':>7} {'×paired':>7} {'paired range':>12} "
        f"{'+TTFT50':>8} "
        f"{'router CPU':>11} {'facade CPU':>11}"
    )
    lines = [head, "-" * len(head)]
    for key, entry in report["results"].items():
        lines.append(f"({key}) {entry['title']}")
        per_1k = key != "iii"
        for target, data in entry["targets"].items():
            m, vs = data["median"], data["vs_a"]
            cpu_key = "cpu_s_per_1k_tokens" if per_1k else "cpu_ms_per_request"
            unit = " s/1k" if per_1k else " ms/rq"
            cold = key == COLD.key
            hop = "proxy_" if target == "p" else "router_"
            lines.append(
                f"{'':<5} {'(' + target + ') ' + TARGET_NAMES[target]:<17} "
                f"{_fmt(None if cold else m.get('tok_s'), '.0f'):>7} "
                f"{_fmt(None if cold else m.get('req_s'), '.1f'):>7} "
                f"{_fmt(m.get('ttft_p50_ms'), '.1f'):>8} "
                f"{_fmt(None if cold else m.get('ttft_p99_ms'), '.1f'):>8} "
                f"{_fmt(m.get('e2e_p50_ms'), '.1f'):>8} "
                f"{_fmt(None if cold else m.get('e2e_p99_ms'), '.1f'):>8} "
                f"{_fmt(None if cold else vs['tok_s_ratio'], '.3f'):>7} "
                f"{_fmt(None if cold else vs['tok_s_ratio_paired'], '.3f'):>7} "
                f"{'-' if cold else _range(vs['tok_s_ratio_paired_range']):>12} "
                f"{_fmt(vs['ttft_p50_delta_ms'], '+.1f'):>8} "
                f"{_fmt(None if cold else m.get(hop + cpu_key), '.3f', unit):>11} "
                f"{_fmt(None if cold else m.get('facade_' + cpu_key), '.3f', unit):>11}"
            )
    lines.append(
        "times in ms (medians over rounds); ratios and +TTFT50 against (a): ×tok/s of the "
        "medians, ×paired the median of each round's ratio, and the lowest and highest of "
        "those (req/s ratios are the same: a "
        "workload's tokens per request are fixed); CPU per 1,000 "
        "streamed tokens (iii: per request) of the process itself, children excluded; (iv) for "
        "(a) is spawn -> first token of a fresh llama-server, for (b)/(c) request -> first "
        "token; (p)'s CPU is the proxy's, in the router column"
    )
    coalescing = []
    for key, entry in report["results"].items():
        grpc = entry["targets"].get("b", {}).get("median", {})
        if key in ("i", "ii") and grpc.get("messages"):
            coalescing.append(f"({key}) {grpc['content_chunks'] / grpc['messages']:.1f}")
    if coalescing:
        lines.append("text chunks per gRPC message, (b): " + ", ".join(coalescing))
    meta = report["meta"]
    lines.append(
        f"load average before {meta['loadavg_before']}, after {meta['loadavg_after']}; "
        f"runs redone because other processes used > {FOREIGN_CORES_LIMIT} cores: "
        f"{meta['foreign_retries']} (and {meta['quiet_wait_s']:.0f} s spent waiting for them); "
        f"most foreign CPU in a kept run: {meta['max_foreign_cores']:.2f} cores"
    )
    if meta.get("compare") is not None:
        lines.append(f"(d) is (c) with {json.dumps(meta['compare'])}")
    if meta.get("otlp_exports") is not None:
        lines.append(
            f"(d) exported {meta['otlp_exports']} OTLP batches "
            f"({meta['otlp_bytes'] / 1e6:.1f} MB) to a receiver in the bench process"
        )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """`value` with NaN (a percentile of nothing, e.g. every request failed) as null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="routermodel-bench-") as directory:
        yield Path(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench.json")
    parser.add_argument(
        "--tracing", action="store_true", help="also (d): router+facade exporting every span"
    )
    parser.add_argument(
        "--compare",
        type=json.loads,
        metavar="JSON",
        help='also (d): router+facade with this merged into its config, e.g. \'{"system": '
        '{"stream_pacing_ms": 4}}\'',
    )
    parser.add_argument(
        "--no-peer", action="store_true", help="leave out (p), the single-hop aiohttp proxy"
    )
    keys = [w.key for w in (*WORKLOADS, COLD)]
    parser.add_argument(
        "--workloads",
        default=",".join(keys),
        help=f"comma-separated subset of {','.join(keys)} (default: all)",
    )
    args = parser.parse_args(argv)
    selected = args.workloads.split(",")
    if not set(selected) <= set(keys):
        parser.error(f"--workloads takes {','.join(keys)}")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (medians of >= 3)")
    if args.tracing and args.compare is not None:
        parser.error("--tracing and --compare both use target (d): choose one")
    if args.compare is not None and not all(isinstance(v, dict) for v in args.compare.values()):
        parser.error('--compare takes {"section": {"key": value}, ...}')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "logs"
    logs.mkdir(exist_ok=True)
    started = time.time()
    load_before = loadavg()
    print(f"load average before: {load_before}", flush=True)
    with workspace() as workdir:
        procs = Processes(logs)
        bench = Bench(
            workdir, procs, tracing=args.tracing, compare=args.compare, peer=not args.no_peer
        )
        # A SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so every process started is stopped.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            bench.setup()
            bench.warm_up()
            for number in range(1, args.rounds + 1):
                bench.round(number, args.rounds, selected)
        finally:
            if bench.loadgen is not None:
                bench.loadgen.quit()
            procs.stop_all()
            if bench.sink is not None:
                bench.sink.stop()
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "rounds": args.rounds,
        "workloads": selected,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "llama_server_argv": bench.direct_argv[3:],
        "foreign_retries": bench.retries,
        "quiet_wait_s": bench.quiet_wait,
        "compare": args.compare,
        "otlp_exports": None if bench.sink is None else bench.sink.exports,
        "otlp_bytes": None if bench.sink is None else bench.sink.bytes,
        "max_foreign_cores": max(
            (
                run.get("foreign_cores", 0.0)
                for per_target in bench.runs.values()
                for runs in per_target.values()
                for run in runs
            ),
            default=0.0,
        ),
    }
    report = build_report(bench, meta)
    print(render(report))
    args.out.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
