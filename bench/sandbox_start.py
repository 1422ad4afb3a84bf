"""Benchmark (not a test): sandbox start-up cost next to a plain interpreter start, same run.

    python3 bench/sandbox_start.py [--runs 100]

Prints a Markdown table and writes the raw numbers to bench/results/sandbox_start.json:

- plain:       `python -I -S -c pass` (the real interpreter, not a shim);
- cold:        the full production sandbox (namespaces, seccomp, binds, tmpfs, slot uid,
               cgroup) running `python -I -S -c pass`, started and waited for;
- job waits:   what a job waits for before its code can start when the worker's spare
               sandbox is ready (sless's default): handing the request to it;
- job total:   a whole trivial attempt (`return input * 2`) through the executor, cold and warm.

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

from sless_daemon.executor import Executor, _data_fd, _spawn, attempt_rlimits, become_subreaper, reap_orphans  # noqa: E402
from sless_daemon.limits import default_limits  # noqa: E402
from sless_daemon.sandbox import SANDBOX_ENV, build_sandbox, sandbox_command  # noqa: E402
from sless_daemon.seccomp_policy import bpf_fd  # noqa: E402
from sless_daemon.settings import Settings  # noqa: E402
from sless_daemon.spec import JobSpec  # noqa: E402


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


def cold_sandbox_start(sandbox, settings: Settings, spec: JobSpec):
    """The production bubblewrap command, with `-c pass` in place of the runner."""

    def start() -> None:
        cgroup = sandbox.cgroups.create(f"bench-{os.getpid()}", spec.memory_mb << 20, 64) if sandbox.cgroups else None
        runner_fd = _data_fd(b"pass\n")
        seccomp_fd = bpf_fd(sandbox.seccomp_bpf)
        command = sandbox_command(sandbox, runner_fd, seccomp_fd, spec.limits.tmpfs_mb << 20, [])
        limits = attempt_rlimits(spec.limits, own_uid=sandbox.host_uid is not None)
        child = _spawn(command, (runner_fd, seccomp_fd), "/", SANDBOX_ENV, limits, cgroup, sandbox.host_uid)
        os.close(runner_fd)
        os.close(seccomp_fd)
        child.communicate()
        assert child.returncode == 0, child.returncode
        if cgroup:
            cgroup.remove()
        reap_orphans()

    return start


def warm_hand_off(executor: Executor, spec: JobSpec):
    """Time from taking the ready spare to the request being in its pipe (the job's wait)."""
    samples = []

    def once() -> None:
        executor.prepare_spare()
        time.sleep(0.08)  # the spare is started while the worker is idle
        started = time.perf_counter()
        spare = executor._take_spare(spec)
        assert spare is not None
        os.write(spare.child.stdin.fileno(), json.dumps({"code": "return 1", "input": None}).encode())
        samples.append((time.perf_counter() - started) * 1000)
        spare.child.stdin.close()
        spare.child.stdout.read()
        spare.child.wait()
        executor.close_launched(spare)

    return once, samples


def attempts(executor: Executor, spec: JobSpec, warm: bool, runs: int) -> list[float]:
    """Milliseconds of `Executor.run` alone; with `warm`, a spare is made ready before each."""
    samples = []
    for _ in range(runs + 2):
        if warm:
            executor.prepare_spare()
            time.sleep(0.08)
        started = time.perf_counter()
        assert executor.run(spec).result == 42
        samples.append((time.perf_counter() - started) * 1000)
    return samples[2:]


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered), 3), "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1], 3),
            "mean_ms": round(statistics.fmean(ordered), 3), "runs": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    become_subreaper()
    settings = Settings.from_env({})
    sandbox = build_sandbox("", settings.sandbox_uid_base + 50, slot=0)
    spec = JobSpec(code="return input * 2", input=21, limits=default_limits(settings), retries=0)
    executor = Executor(settings, sandbox, "bench", reap_orphans=True)
    hand_off, hand_off_samples = warm_hand_off(executor, spec)
    timed(hand_off, args.runs)
    results = {
        "plain python -I -S -c pass": summary(timed(plain_start(sandbox.python), args.runs)),
        "cold sandbox + python -c pass": summary(timed(cold_sandbox_start(sandbox, settings, spec), args.runs)),
        "job waits for a warm sandbox": summary(hand_off_samples[2:]),
        "whole attempt, cold sandbox": summary(attempts(Executor(settings, sandbox, "bench-cold", reap_orphans=True),
                                                        spec, False, args.runs)),
        "whole attempt, warm sandbox": summary(attempts(executor, spec, True, args.runs)),
    }
    base = results["plain python -I -S -c pass"]["p50_ms"]
    print(f"| measure ({args.runs} runs) | p50 ms | p95 ms | p50 / plain start |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p50_ms'] / base:.2f}x |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"python": sandbox.python, "cgroups": sandbox.cgroups.version if sandbox.cgroups else None,
            "host_uid": sandbox.host_uid, "cpus": os.cpu_count()}
    (out / "sandbox_start.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
