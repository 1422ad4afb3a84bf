"""No accepted job is lost: workers, Redis, MongoDB and the daemon killed for real, mid-run.

Smaller versions of the scenarios scripts/chaos measures at full size. Each test
asserts the same thing: every job that got a jobId reaches exactly one terminal
state in MongoDB.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from stack import Stack, wait_until

FAST_RECOVERY = {"lease_s": 3, "orphan_grace_s": 1, "sweep_interval_s": 0.5}
SHORT_JOB = "import time\ntime.sleep(0.05)\nreturn input"


def all_terminal(stack: Stack, job_ids: list[str], timeout_s: float = 90) -> list[dict]:
    """Wait until every job is completed or failed; return their records from MongoDB."""
    docs: list[dict] = []

    def done() -> bool:
        nonlocal docs
        docs = stack.records(job_ids)
        return all(d and d["state"] in ("completed", "failed") for d in docs)

    try:
        wait_until(done, timeout_s, "jobs did not all finish", interval_s=0.25)
    finally:
        states = {}
        for doc in docs:
            state = doc["state"] if doc else "missing"
            states[state] = states.get(state, 0) + 1
        print(f"states of {len(job_ids)} jobs: {states}")
    return docs


def submit_many(stack: Stack, count: int, accept_503: bool = False) -> tuple[list[str], int]:
    """Submit `count` jobs; returns the accepted ids and how many were refused with 503."""
    accepted, refused = [], 0
    for i in range(count):
        try:
            answer = stack.post("/submit", {"code": SHORT_JOB, "input": i}, timeout=10)
        except requests.RequestException:
            if not accept_503:
                raise
            refused += 1
            continue
        if answer.status_code == 503 and accept_503:
            refused += 1
            continue
        assert answer.status_code == 202, answer.text
        accepted.append(answer.json()["jobId"])
    return accepted, refused


def test_a_killed_worker_host_is_recovered_through_its_lease(make_stack):
    """Workers and pool SIGKILLed together (a host lost): another pool picks the job up."""
    s = make_stack(workers=1, **FAST_RECOVERY)
    job_id = s.submit({"code": "import time\ntime.sleep(1.5)\nreturn 'done'", "retries": 1})
    wait_until(lambda: s.get(f"/status/{job_id}").json()["state"] == "running", 20, "job did not start")
    for pid in s.worker_pids():
        os.killpg(pid, signal.SIGKILL)
    os.killpg(s.pool.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    s.pool.wait()
    s.start_pool()  # a pool on another "host": it never saw the dead workers
    doc = s.wait_terminal(job_id, timeout_s=30)
    print(f"kill to completion: {time.monotonic() - killed_at:.1f} s")
    assert doc["state"] == "completed" and doc["attempts"] == 2
    assert doc["attempt_errors"][0]["type"] == "worker_lost"


def test_redis_restart_without_persistence_loses_no_job(make_stack, private_redis):
    s = make_stack(workers=2, redis_url=private_redis.url, **FAST_RECOVERY)
    first, _ = submit_many(s, 40)
    private_redis.kill()  # the queue and every message in it are gone
    private_redis.start()
    second, _ = submit_many(s, 20)
    docs = all_terminal(s, first + second)
    assert {d["state"] for d in docs} == {"completed"}
    assert sorted(int(d["result_json"]) for d in docs) == sorted(list(range(40)) + list(range(20)))


def test_mongo_outage_gives_503_and_loses_no_accepted_job(make_stack, private_mongo):
    s = make_stack(workers=2, mongo_url=private_mongo.url, **FAST_RECOVERY)
    before, _ = submit_many(s, 30)
    private_mongo.kill()
    during, refused = submit_many(s, 5, accept_503=True)
    assert during == [] and refused == 5
    answer = s.post("/submit", {"code": "return 1"})
    assert answer.status_code == 503 and answer.json()["error"].startswith("MongoDB is unavailable")
    time.sleep(2)  # workers finishing attempts now must keep their outcomes
    private_mongo.start()
    after, _ = submit_many(s, 10)
    docs = all_terminal(s, before + after)
    assert {d["state"] for d in docs} == {"completed"}
    assert all(d["finished_at"] for d in docs)


def test_daemon_restart_loses_no_job(make_stack):
    s = make_stack(workers=2, **FAST_RECOVERY)
    first, _ = submit_many(s, 20)
    s.daemon.send_signal(signal.SIGKILL)
    s.daemon.wait()
    s.daemon = s._spawn("daemon", "daemon")
    wait_until(lambda: s._answers("/"), 15, "the daemon did not come back")
    second, _ = submit_many(s, 20)
    docs = all_terminal(s, first + second)
    assert len(docs) == 40 and {d["state"] for d in docs} == {"completed"}


def test_a_poison_job_never_stops_the_worker(make_stack):
    """Code that kills its own sandbox's init and crashes hard: the worker logs it and goes on."""
    s = make_stack(workers=1)
    pid_before = s.worker_pids()
    # the init ignores the kill (a signal from inside its namespace), so the first one hangs until its
    # time limit: it sleeps well past it, or a loaded machine might read its end before the deadline's
    poison = ["import os, signal\nos.kill(1, signal.SIGKILL)\nimport time\ntime.sleep(30)",
              "import ctypes\nctypes.string_at(0)", "import os\nos.close(1)\nos.close(2)\nraise SystemExit(3)"]
    for code in poison:
        assert s.wait_terminal(s.submit({"code": code, "retries": 0, "timeout_s": 1}))["state"] == "failed"
    assert s.wait_terminal(s.submit({"code": "return 'alive'"}))["result"] == "alive"
    assert s.worker_pids() == pid_before


def test_an_outcome_lost_with_its_worker_before_its_claim_was_written_is_run_again(make_stack, private_mongo):
    """A quiet attempt that ends within the claim hold has no lease: its claim goes in with its
    settle (worker.AttemptRunner), and its message stays taken until that is written. Here
    MongoDB hangs (SIGSTOP) while the outcome waits, the worker takes (no) next message, and
    is then killed with the outcome in memory: the message is still taken, so the sweep sends
    it again and the job completes, on its first attempt (it never counted as started)."""
    s = make_stack(workers=1, mongo_url=private_mongo.url, claim_hold_s=1, orphan_scan_interval_s=1,
                   **{**FAST_RECOVERY, "lease_s": 5})
    job_id = s.submit({"code": "import time\ntime.sleep(0.3)\nreturn 'done'", "retries": 0})
    redis, taken = s.redis(), f"sless:taken:{s.queue_name}"
    message = f"{job_id}-0"
    wait_until(lambda: redis.zscore(taken, message) is not None, 20, "the worker did not take the message")
    os.kill(private_mongo.process.pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # the attempt ended; its worker went back to the (empty) queue, twice
        assert redis.zscore(taken, message) is not None  # not marked finished: its record is not written
        [first], [pid] = s.live_workers(), s.worker_pids()
        os.killpg(pid, signal.SIGKILL)
    finally:
        os.kill(private_mongo.process.pid, signal.SIGCONT)
    doc = s.wait_terminal(job_id, timeout_s=40)
    assert doc["state"] == "completed" and doc["result"] == "done" and doc["attempts"] == 1
    assert doc["attempt_errors"] == [] and doc["worker"] != first
    # marked finished in the announcement that follows the record, a moment after it
    wait_until(lambda: redis.zscore(taken, message) is None, 10, "the message stayed taken after its record")
