"""Benchmark (not a test): what each operation on a job's path costs, one at a time.

    python3 bench/job_path_costs.py [--runs 300]

Against the running services (`scripts/services start`), in a scratch database and
queue that it removes afterwards, it times every Redis and MongoDB operation a job
goes through (submit, take, claim, settle, announce, lease drop) and prints, per
call: this process's CPU (what a daemon or worker pays), FerretDB's CPU (read from
/proc) and the wall time. That is how the steps of session 4 were chosen: the
drain's totals (`bench/profile_drain.py`) say which process costs; this says which
call does.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sless_daemon.consumer import Consumer  # noqa: E402
from sless_daemon.lifecycle import new_job_id, utcnow  # noqa: E402
from sless_daemon.limits import default_limits  # noqa: E402
from sless_daemon.queue import JobQueue, connect_redis  # noqa: E402
from sless_daemon.settings import Settings  # noqa: E402
from sless_daemon.spec import JobSpec  # noqa: E402
from sless_daemon.store import OutcomeStore, connect_mongo, settle_event  # noqa: E402


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ferretdb_cpu_s() -> float:
    """CPU seconds of the FerretDB process (0 when MongoDB is not a local FerretDB)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ferretdb" in (entry / "cmdline").read_bytes():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return 0.0


def measure(name: str, call, runs: int) -> None:
    """Run `call(i)` for i in range(runs) and print the costs of one call."""
    own, ferret, wall = own_cpu_s(), ferretdb_cpu_s(), time.perf_counter()
    for i in range(runs):
        call(i)
    own, ferret, wall = own_cpu_s() - own, ferretdb_cpu_s() - ferret, time.perf_counter() - wall
    print(f"| {name} | {own / runs * 1000:.3f} | {ferret / runs * 1000:.3f} | {wall / runs * 1000:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    runs = parser.parse_args().runs
    settings = Settings.from_env({})
    scratch = f"sless_costs_{uuid.uuid4().hex[:8]}"
    store = OutcomeStore(connect_mongo(settings.mongo_url), scratch)
    store.ensure_indexes()
    queue = JobQueue(connect_redis(settings.redis_url), scratch)
    spec = JobSpec(code="return input * 2", input=1, limits=default_limits(settings), retries=0)
    ids = [new_job_id() for _ in range(runs)]
    jobs, now = [], utcnow()
    consumer = Consumer(queue, f"{scratch}-worker", lambda message, queued: True)  # handled: the next TAKE marks it
    settles = [settle_event(job_id, 1, {"state": "completed", "result_json": "2", "stdout": "", "stderr": "",
                                        "duration_ms": 1.0}, None, "bench") for job_id in ids]
    print(f"Costs of one call, mean of {runs} calls (MongoDB at {settings.mongo_url}, Redis at {settings.redis_url})\n")
    print("| operation | caller CPU ms | FerretDB CPU ms | wall ms |")
    print("|---|---|---|---|")
    try:
        measure("submit: insert the job (`jobs.insert_many` of one)", lambda i: jobs.extend(store.insert_many([(ids[i], spec)], now)), runs)
        measure("submit: enqueue (RQ `enqueue_many` of one)", lambda i: queue.enqueue(jobs[i], 0), runs)
        measure("worker: take a message (`TAKE`, one round trip)", lambda i: consumer.take_one(), runs)
        measure("worker: claim (lease + claim event inserts)",
                lambda i: store.claim(ids[i], 1, "bench", now, now + timedelta(seconds=30)), runs)
        measure("worker: settle (`events.insert_many` of one)", lambda i: store.settle_many([settles[i]], "bench"), runs)
        measure("worker: announce the settle (one pipeline)", lambda i: queue.announce_settled([settles[i]]), runs)
        measure("worker: renew a lease (`update_one` by `_id`)",
                lambda i: store.renew_lease(ids[i], 1, "bench", now), runs)
        measure("worker: drop one lease (`delete_one` by `_id`)", lambda i: store.drop_leases([(ids[i], 1)]), runs)
        measure("status: read one event by `_id` (`find_one`)",
                lambda i: store.events.find_one({"_id": f"{ids[-1 - i]}/1/settle"}), runs)
    finally:
        store.client.drop_database(scratch)
        queue.connection.delete(queue.rq_queue.key, queue.intermediate_key, queue.taken_key,
                                *[f"rq:job:{job_id}-0" for job_id in ids])
        queue.connection.srem(queue.rq_queue.redis_queues_keys, queue.rq_queue.key)


if __name__ == "__main__":
    main()
