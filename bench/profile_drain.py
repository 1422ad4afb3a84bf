"""Profile (not a test): where the time of a draining sless worker goes.

    python3 bench/profile_drain.py [--jobs 1000] [--workers 1] [--spy]

Submits `--jobs` `return input * 2` jobs with no worker running, starts the pool, and
waits until all are recorded. Prints jobs/s and the CPU each job cost the worker
processes and FerretDB (from /proc). With `--spy` it also records the first worker
with py-spy for 12 s (`pip install py-spy`) and prints the functions holding the most
samples (inclusive), the way the steps in BENCHMARKS.md were chosen.
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

from tests.stack import Stack, wait_until  # noqa: E402

SPY_SECONDS = 12


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ferretdb_pid() -> int:
    found = subprocess.run(["pgrep", "-f", "ferretdb"], capture_output=True, text=True).stdout.split()
    if not found:
        raise SystemExit("FerretDB is not running: scripts/services start")
    return int(found[0])


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
    parser.add_argument("--spy", action="store_true")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="sless-profile-"))
    stack = Stack(logs, workers=0).start()
    try:
        session = requests.Session()
        for i in range(args.jobs):
            session.post(stack.url + "/submit", json={"code": "return input * 2", "input": i}).raise_for_status()
        stack.workers = args.workers
        stack.start_pool()
        workers, ferretdb = stack.worker_pids(), ferretdb_pid()
        before = sum(cpu_s(p) for p in workers), cpu_s(ferretdb), time.monotonic()
        spy = None
        if args.spy:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(workers[0]), "-d", str(SPY_SECONDS), "-r", "200",
                                    "-f", "raw", "-o", str(logs / "worker.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        events = stack.mongo_jobs().database["events"]
        wait_until(lambda: events.count_documents({"step": "settle", "state": "completed"}) >= args.jobs,
                   900, "the jobs did not all complete", interval_s=0.5)
        elapsed = time.monotonic() - before[2]
        worker_ms = (sum(cpu_s(p) for p in workers) - before[0]) * 1000 / args.jobs
        ferretdb_ms = (cpu_s(ferretdb) - before[1]) * 1000 / args.jobs
        print(f"{args.jobs} jobs, {args.workers} workers: {args.jobs / elapsed:.1f} jobs/s; CPU per job: "
              f"workers {worker_ms:.2f} ms, FerretDB {ferretdb_ms:.2f} ms")
        if spy:
            spy.wait()
            for share, name in top_frames(logs / "worker.txt"):
                print(f"{share:5.1f}%  {name}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
