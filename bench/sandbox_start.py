"""Benchmark (not a test): sandbox start-up cost next to a plain interpreter start, same run.

    python3 bench/sandbox_start.py [--runs 100]

Prints a Markdown table and writes the raw numbers to bench/results/sandbox_start.json:

- plain:           `python -I -S -c pass` (the real interpreter, not a shim);
- server start:    a worker's whole sandbox (bubblewrap, namespaces, seccomp, binds, slot
                   uid, cgroup) with its fork server ready: paid once per worker;
- attempt sandbox: what each job pays: a fork of the server entering fresh PID, network,
                   IPC, UTS, mount and user namespaces, fresh /proc, /work, /dev/shm,
                   rlimits and the seccomp filter, until the job's code starts;
- job total:       a whole trivial attempt (`return input * 2`) through the executor, with
                   the server running (the normal case) and with a server started for it.

Needs root for the slot uid and cgroups, as the worker uses them (it still works without).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sless_daemon.executor import Executor, become_subreaper  # noqa: E402
from sless_daemon.jobhost import JobHost  # noqa: E402
from sless_daemon.limits import default_limits  # noqa: E402
from sless_daemon.sandbox import build_sandbox  # noqa: E402
from sless_daemon.settings import Settings  # noqa: E402
from sless_daemon.spec import JobSpec  # noqa: E402

PLAIN = "plain python -I -S -c pass"


def timed(action, runs: int) -> list[float]:
    """Milliseconds per call, after two warm-up calls."""
    action(), action()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def plain_start(python: str):
    return lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)


def server_start(settings: Settings, sandbox):
    """A worker's sandbox with its fork server, started until ready, then stopped."""
    return lambda: JobHost.start(settings, sandbox, "bench-start", reap_init=True).stop()


def attempts(executor: Executor, spec: JobSpec, mode: str, runs: int) -> dict[str, list[float]]:
    """Milliseconds of `Executor.run`, of the job's wait for its sandbox, and of the
    sandbox's build (order sent to code started). `mode`: "spare" (the worker's idle
    time ordered the next sandbox, as in production), "ordered" (ordered when the job
    comes) or "cold" (the fork server itself is started for the job)."""
    samples: dict[str, list[float]] = {"total": [], "wait": [], "build": []}
    for _ in range(runs + 2):
        if mode == "spare":
            executor.prepare()
            time.sleep(0.02)  # the worker is idle for a moment between jobs
        elif mode == "cold":
            executor.close()
        started = time.perf_counter()
        outcome = executor.run(spec)
        samples["total"].append((time.perf_counter() - started) * 1000)
        assert outcome.result == 42, outcome
        t = outcome.timings
        samples["wait"].append((t["sandbox_ready_at"] - t["sandbox_asked_at"]) * 1000)
        samples["build"].append((t["code_started_at"] - t["sandbox_ready_at"]) * 1000)
    return {name: values[2:] for name, values in samples.items()}


def measures(runs: int) -> dict[str, list[float]]:
    """Samples (ms) of each measure, all in this run."""
    become_subreaper()
    settings = Settings.from_env({})
    sandbox = build_sandbox("", settings.sandbox_uid_base + 50, slot=0)
    spec = JobSpec(code="return input * 2", input=21, limits=default_limits(settings), retries=0)
    executor = Executor(settings, sandbox, "bench", reap_orphans=True)
    spare, ordered = attempts(executor, spec, "spare", runs), attempts(executor, spec, "ordered", runs)
    cold_executor = Executor(settings, sandbox, "bench-cold", reap_orphans=True)
    cold = attempts(cold_executor, spec, "cold", runs)
    cold_executor.close()
    executor.close()
    return {
        PLAIN: timed(plain_start(sandbox.python), runs),
        "worker's sandbox + fork server start (once per worker)": timed(server_start(settings, sandbox), runs),
        "fresh attempt sandbox: fork, namespaces, mounts, uid, filter (every job)": ordered["build"],
        "job waits for its sandbox (spare ordered while idle, the default)": spare["wait"],
        "whole attempt, spare sandbox (the default)": spare["total"],
        "whole attempt, sandbox ordered when the job comes": ordered["total"],
        "whole attempt, fork server started for it": cold["total"],
    }


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered), 3), "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1], 3),
            "mean_ms": round(statistics.fmean(ordered), 3), "runs": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    results = {name: summary(samples) for name, samples in measures(args.runs).items()}
    base = results[PLAIN]["p50_ms"]
    print(f"| measure ({args.runs} runs) | p50 ms | p95 ms | p50 / plain start |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p50_ms'] / base:.2f}x |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    sandbox = build_sandbox("", Settings.from_env({}).sandbox_uid_base + 50, slot=0)
    meta = {"python": sandbox.python, "cgroups": sandbox.cgroups.version if sandbox.cgroups else None,
            "host_uid": sandbox.host_uid, "cpus": os.cpu_count()}
    (out / "sandbox_start.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
