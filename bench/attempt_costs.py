"""Benchmark (not a test): what one attempt costs the worker's fork server, in CPU and page faults.

    python3 bench/attempt_costs.py [--runs 400]

Drives an executor directly (no queue, no MongoDB), as a worker does: a spare sandbox
ordered while idle, then `return input * 2` in it, `--runs` times. Prints, per attempt,
the wall time, the CPU of the fork server with the attempts it forked and reaped (from
/proc), the worker side's CPU, and the minor page faults in the server and in the
attempts: forked from a warm interpreter, an attempt pays a copy-on-write fault for
every page it writes, which is most of its cost (session 4, step 12, in BENCHMARKS.md).
Needs root for the slot uid and cgroups, as a worker has them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sless_daemon.executor import Executor, become_subreaper  # noqa: E402
from sless_daemon.limits import default_limits  # noqa: E402
from sless_daemon.sandbox import build_sandbox  # noqa: E402
from sless_daemon.settings import Settings  # noqa: E402
from sless_daemon.spec import JobSpec  # noqa: E402


def fork_servers() -> dict[int, tuple[int, int, float]]:
    """pid -> (own minor faults, reaped children's minor faults, CPU s with reaped children) of
    every fork server on the machine: runner.py started by bubblewrap (its attempts are
    forks of it, whose parent is the server)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            if b"runner.py" not in command or b"bwrap" in command.split(b"\0")[0]:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if b"bwrap" not in Path(f"/proc/{fields[1]}/cmdline").read_bytes().split(b"\0")[0]:
                continue
            cpu = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            found[int(entry.name)] = (int(fields[7]), int(fields[8]), cpu)
        except OSError:
            continue
    return found


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400)
    runs = parser.parse_args().runs
    become_subreaper()
    settings = Settings.from_env({})
    sandbox = build_sandbox(settings.sandbox_python, settings.sandbox_uid_base + 50, slot=0)
    spec = JobSpec(code="return input * 2", input=21, limits=default_limits(settings), retries=0)
    executor = Executor(settings, sandbox, "bench-attempt", reap_orphans=True)
    others = set(fork_servers())
    executor.prepare()
    for _ in range(20):  # warm up
        executor.run(spec)
        executor.prepare()
    time.sleep(0.2)
    [server] = [pid for pid in fork_servers() if pid not in others]
    before, cpu, started = fork_servers()[server], own_cpu_s(), time.perf_counter()
    for _ in range(runs):
        outcome = executor.run(spec)
        assert outcome.result == 42, outcome
        executor.prepare()
    wall, cpu = time.perf_counter() - started, own_cpu_s() - cpu
    time.sleep(0.2)
    after = fork_servers()[server]
    executor.close()
    print(f"| measure, per attempt ({runs} attempts) | value |")
    print("|---|---|")
    print(f"| wall time (the job's run and the next spare's order) | {wall / runs * 1000:.2f} ms |")
    print(f"| fork server CPU, with the attempts it reaped | {(after[2] - before[2]) / runs * 1000:.2f} ms |")
    print(f"| worker side CPU (executor) | {cpu / runs * 1000:.2f} ms |")
    print(f"| minor page faults in the fork server | {(after[0] - before[0]) / runs:.0f} |")
    print(f"| minor page faults in the attempt's processes | {(after[1] - before[1]) / runs:.0f} |")


if __name__ == "__main__":
    main()
