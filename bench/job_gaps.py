"""Profile (not a test): where a job's time goes that is not its code, from the times it records.

    .venv-bench/bin/python bench/job_gaps.py drain [--function cpu10] [--jobs 600]
    .venv-bench/bin/python bench/job_gaps.py tail  [--calls 1000] [--set sweep_interval_s=60 ...]

`drain`: one worker drains `--jobs` queued jobs; from each attempt's recorded times
(its settle event's `timings`) it prints the median user code and the median gap
between one job's code ending and the next one's starting, cut where the worker took
the next message and had its sandbox, and when the fork server had that sandbox made
(`sandbox_made_at`, reported from inside it): what a lane spends between jobs
(compare.py's budget table). `tail`: `--calls` sequential `POST /execute` calls to a one-worker stack;
prints p50, p99 and how many calls took over 1.7x the p50, and for each of those the
spans (client send -> enqueued -> dequeued -> ... -> recorded -> answer seen) that
grew by over 1 ms against their medians. `--set` changes a setting of the stack.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pymongo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402
import tasks  # noqa: E402
from tests.stack import MONGO_URL, Stack  # noqa: E402

STAGES = ("enqueued_at", "dequeued_at", "sandbox_ready_at", "code_started_at", "code_ended_at", "recorded_at")


def recorded_timings(stack: Stack) -> list[dict]:
    """Every attempt's recorded times, in the order their code started."""
    events = pymongo.MongoClient(MONGO_URL)[stack.db_name].events.find({"_id": {"$regex": "settle$"}})
    timings = [(event.get("changes") or {}).get("timings") or {} for event in events]
    return sorted((t for t in timings if "code_started_at" in t), key=lambda t: t["code_started_at"])


def log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sless-gaps-"))


def median_ms(values) -> float:
    return statistics.median(values) * 1000


def drain(args, settings: dict) -> None:
    with compare.running_stack(log_dir(), 0, **settings) as stack:
        drained = compare.sless_drain(stack, args.function, args.jobs, 1)
        times = recorded_timings(stack)
    pairs = list(zip(times, times[1:]))
    print(f"{args.function}, {args.jobs} jobs, W=1: {drained['jobs_per_s']:.1f} jobs/s; "
          f"user code {median_ms(t['code_ended_at'] - t['code_started_at'] for t in times):.2f} ms; "
          f"between one job's code and the next's {median_ms(b['code_started_at'] - a['code_ended_at'] for a, b in pairs):.2f} ms:")
    for name, start, end in (("code ended -> next message taken", "code_ended_at", "dequeued_at"),
                             ("message taken -> its sandbox in hand", "dequeued_at", "sandbox_ready_at"),
                             ("sandbox in hand -> code started", "sandbox_ready_at", "code_started_at"),
                             ("code ended -> next sandbox made", "code_ended_at", "sandbox_made_at"),
                             ("next sandbox made -> its code started", "sandbox_made_at", "code_started_at")):
        ahead = start == "code_ended_at"  # measured from the job before
        print(f"  {name}: {median_ms(b[end] - (a if ahead else b)[start] for a, b in pairs):.2f} ms")


def spans(sent: float, seen: float, timings: dict) -> dict[str, float]:
    points = [("sent", sent)] + [(k, timings.get(k)) for k in STAGES] + [("seen", seen)]
    points = [(k, v) for k, v in points if isinstance(v, (int, float))]
    return {f"{a} -> {b}": (tb - ta) * 1000 for (a, ta), (b, tb) in zip(points, points[1:])}


def tail(args, settings: dict) -> None:
    with compare.running_stack(log_dir(), 1, **settings) as stack:
        connection = compare.keep_alive(stack.url)
        for value in range(compare.WARMUP_CALLS):
            compare.post_json(connection, "/execute", {"code": tasks.SLESS_CODE["double"], "input": value})
        calls = []
        with compare.collector_off():
            for value in range(args.calls):
                sent, started = time.time(), time.perf_counter()
                _, body = compare.post_json(connection, "/execute", {"code": tasks.SLESS_CODE["double"], "input": value})
                calls.append(((time.perf_counter() - started) * 1000, spans(sent, time.time(), body.get("timings") or {}),
                              sent))
    summary = compare.latency_summary([ms for ms, _, _ in calls])  # the percentiles compare.py reports
    p50 = summary["p50_ms"]
    slow = [(i, ms, parts, sent - calls[0][2]) for i, (ms, parts, sent) in enumerate(calls) if ms > 1.7 * p50]
    print(f"{args.calls} calls: p50 {p50:.2f} ms, p99 {summary['p99_ms']:.2f} ms, {len(slow)} over 1.7x the p50")
    medians = {name: statistics.median(parts[name] for _, parts, _ in calls if name in parts) for name in calls[0][1]}
    print("median spans (ms): " + ", ".join(f"{name} {value:.2f}" for name, value in medians.items()))
    for index, ms, parts, at in slow:
        grown = {name: round(value - medians[name], 1) for name, value in parts.items()
                 if name in medians and value - medians[name] > 1.0}
        print(f"  call {index} at {at:.3f} s: {ms:.1f} ms, grown: {grown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("drain", "tail"))
    parser.add_argument("--function", choices=sorted(tasks.SLESS_CODE), default="cpu10")
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    (drain if args.what == "drain" else tail)(args, settings)


if __name__ == "__main__":
    main()
