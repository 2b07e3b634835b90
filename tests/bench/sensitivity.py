"""`python -m tests.bench.sensitivity`: what any CPU use beside llama-server costs it here.

The bench's (a), llama-server alone, runs a workload with and without a synthetic load: a
process that wakes every PERIOD_MS and spins for a share of it. The two are interleaved, and
the order flips every round. The table gives the synthetic load's measured cores and the paired
ratio of llama-server's tok/s with it to without it.

It sets a ceiling for any proxy in front of llama-server on this machine. A router and facade
that use X cores net of what they save the load generator cannot score more than this ratio at
X cores, however the work is spread. With 2 cores and `-t 1`, one core is llama-server's
compute thread, and the other is shared by its HTTP threads, the load generator and anything
else. A small load on the other core already costs the compute thread its core now and then.

Writes bench-results/sensitivity.json. Usage: `python -m tests.bench.sensitivity
[--rounds N] [--workload ii] [--loads 0.1,0.2,0.3]`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.__main__ import (
    WORKLOADS,
    Bench,
    Processes,
    loadavg,
    median,
    tree_cpu_seconds,
)
from tests.helpers import PYTHON, REPO

PERIOD_MS = 3.0
# The synthetic load: sleep, then spin for `busy` seconds, forever (until killed).
_SPINNER = """
import sys, time
period, busy = float(sys.argv[1]), float(sys.argv[2])
while True:
    time.sleep(period)
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
"""


def _spinner(procs: Processes, cores: float) -> subprocess.Popen[bytes]:
    period = PERIOD_MS / 1000
    busy = period * cores / (1 - cores)  # spin `cores` of each sleep + spin cycle
    return procs.start("spinner", [PYTHON, "-c", _SPINNER, str(period), str(busy)]).popen


def _measure(bench: Bench, procs: Processes, key: str, cores: float) -> dict[str, Any]:
    workload = next(w for w in WORKLOADS if w.key == key)
    bench._wait_quiet()  # then no retries: the spinner is foreign CPU on purpose
    if not cores:
        return bench._measure_once("a", workload)
    spinner = _spinner(procs, cores)
    try:
        time.sleep(0.05)  # let it start
        cpu_before, started = tree_cpu_seconds(spinner.pid), time.monotonic()
        run = bench._measure_once("a", workload)
        run["spinner_cores"] = (tree_cpu_seconds(spinner.pid) - cpu_before) / (
            time.monotonic() - started
        )
    finally:
        spinner.send_signal(signal.SIGKILL)
        spinner.wait()
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sensitivity", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (>= 3)")
    parser.add_argument("--workload", default="ii", choices=[w.key for w in WORKLOADS])
    parser.add_argument(
        "--loads", default="0.1,0.2,0.3", help="synthetic loads, in cores (each in (0, 0.9])"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "sensitivity.json")
    args = parser.parse_args(argv)
    loads = [float(x) for x in args.loads.split(",")]
    if args.rounds < 3 or not all(0 < x <= 0.9 for x in loads):
        parser.error("--rounds takes >= 3 and --loads values in (0, 0.9]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {loadavg()}", flush=True)
    runs: dict[float, list[tuple[dict[str, Any], dict[str, Any]]]] = {x: [] for x in loads}
    with tempfile.TemporaryDirectory(prefix="routermodel-sensitivity-") as directory:
        procs = Processes(Path(directory))
        bench = Bench(Path(directory), procs)
        try:
            bench.start_direct()
            bench.start_loadgen()
            _measure(bench, procs, args.workload, 0.0)  # warm-up
            for number in range(args.rounds):
                for cores in loads:
                    order = (0.0, cores) if number % 2 == 0 else (cores, 0.0)
                    done = {x: _measure(bench, procs, args.workload, x) for x in order}
                    runs[cores].append((done[0.0], done[cores]))
                print(f"round {number + 1}/{args.rounds} done", flush=True)
        finally:
            if bench.loadgen is not None:
                bench.loadgen.quit()
            procs.stop_all()
    report = {"workload": args.workload, "period_ms": PERIOD_MS, "loads": []}
    print(f"(a) llama-server alone at ({args.workload}), with a synthetic load beside it")
    print(
        f"{'load':>6} {'measured':>9} {'tok/s alone':>12} {'tok/s with':>11} {'×paired':>8} range"
    )
    for cores, pairs in runs.items():
        ratios = [with_["tok_s"] / alone["tok_s"] for alone, with_ in pairs]
        entry = {
            "cores": cores,
            "measured_cores": median([w["spinner_cores"] for _, w in pairs]),
            "tok_s_alone": median([a["tok_s"] for a, _ in pairs]),
            "tok_s_with": median([w["tok_s"] for _, w in pairs]),
            "ratio_paired": median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
        report["loads"].append(entry)
        print(
            f"{cores:>6.2f} {entry['measured_cores']:>9.2f} {entry['tok_s_alone']:>12.0f} "
            f"{entry['tok_s_with']:>11.0f} {entry['ratio_paired']:>8.3f} "
            f"{min(ratios):.2f}–{max(ratios):.2f}"
        )
    print(f"load average after: {loadavg()}")
    args.out.write_text(json.dumps({**report, "runs": {str(k): v for k, v in runs.items()}}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
