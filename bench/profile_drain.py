"""Profile (not a test): where the time of a draining sless worker goes.

    python3 bench/profile_drain.py [--jobs 1000] [--workers 1] [--function double|cpu10] [--spy]
                                   [--set claim_hold_s=0 ...]

Submits `--jobs` jobs of `--function` (bench/tasks.py; `double` is `return input * 2`) with no worker running, starts the pool, and
waits until all are recorded (counting cheaply, as bench/compare.py does). Prints
jobs/s (from starting the pool, so a little below compare.py's) and the CPU each job
cost every process on the machine, grouped by command line, from /proc: the workers,
their sandboxes' fork servers (with the attempts they forked and reaped), FerretDB,
Redis. With `--spy` it also records the first worker with py-spy for 12 s (`pip
install py-spy`) and prints the functions holding the most samples (inclusive), the
way the steps in BENCHMARKS.md were chosen.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402
import tasks  # noqa: E402
from tests.stack import Stack  # noqa: E402

SPY_SECONDS = 12


def cpu_table() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds of it and its reaped children) for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:70]
        except OSError:
            continue
        table[int(entry.name)] = (command or f"[{entry.name}]", sum(int(f) for f in fields[11:15]))
    return table


def cpu_by_command(before: dict, after: dict) -> collections.Counter:
    """CPU seconds spent between two tables, per command line (kernel threads share one name)."""
    spent = collections.Counter()
    for pid, (command, ticks) in after.items():
        earlier = before.get(pid)
        spent[command] += ticks - (earlier[1] if earlier and earlier[0] == command else 0)
    return collections.Counter({k: v / os.sysconf("SC_CLK_TCK") for k, v in spent.items() if v})


def mongo_commands(stack: Stack) -> collections.Counter:
    """How many of each command the MongoDB server ran so far (FerretDB's serverStatus counters)."""
    import pymongo

    status = pymongo.MongoClient(stack.env["SLESS_MONGO_URL"]).admin.command("serverStatus")
    return collections.Counter({name: c["total"] for name, c in status.get("metrics", {}).get("commands", {}).items()})


def top_frames(raw: Path, count: int = 30) -> list[tuple[float, str]]:
    """Inclusive share of samples per function, from py-spy's raw (collapsed) output."""
    total, inclusive = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        total += int(samples)
        for frame in {f.split(" (")[0] for f in stack.split(";")}:
            inclusive[frame] += int(samples)
    return [(100 * n / max(total, 1), name) for name, n in inclusive.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--function", choices=sorted(tasks.SLESS_CODE), default="double")
    parser.add_argument("--spy", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of the stack (settings.py field), e.g. claim_hold_s=0 to compare")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="sless-profile-"))
    stack = Stack(logs, workers=0, **dict(item.split("=", 1) for item in args.set)).start()
    try:
        session = requests.Session()
        for i in range(args.jobs):
            session.post(stack.url + "/submit", json={"code": tasks.SLESS_CODE[args.function], "input": i}).raise_for_status()
        stack.workers = args.workers
        commands_before = mongo_commands(stack)
        before, started = cpu_table(), time.monotonic()
        stack.start_pool()
        spy = None
        if args.spy:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(stack.worker_pids()[0]), "-d", str(SPY_SECONDS),
                                    "-r", "200", "-f", "raw", "-o", str(logs / "worker.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        compare.wait_for_count(lambda: compare.sless_terminal(stack), args.jobs, 0.2,
                               lambda: stack.pool.poll() is None, "sless")
        elapsed = time.monotonic() - started
        spent = cpu_by_command(before, cpu_table())
        total_ms = sum(spent.values()) * 1000 / args.jobs
        print(f"{args.jobs} jobs, {args.workers} workers: {args.jobs / elapsed:.1f} jobs/s; "
              f"CPU per job {total_ms:.2f} ms, of which:")
        for command, seconds in spent.most_common(6):
            print(f"  {seconds * 1000 / args.jobs:6.2f} ms  {command}")
        made = mongo_commands(stack) - commands_before
        print("MongoDB commands per job (the drain's own counting included): " +
              ", ".join(f"{name} {count / args.jobs:.2f}" for name, count in made.most_common(6)))
        if spy:
            spy.wait()
            for share, name in top_frames(logs / "worker.txt"):
                print(f"{share:5.1f}%  {name}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
