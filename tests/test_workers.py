"""The worker pool with real processes: replacement, lost workers, graceful stop, logs."""

from __future__ import annotations

import json
import os
import signal

import pytest

from stack import wait_until

SLOW_JOB = "import time\ntime.sleep({seconds})\nreturn 'slept'"


def running_worker_pid(stack, job_id: str) -> int:
    """Wait until the job runs, then return the PID of the worker process holding it."""
    import rq

    doc = {}

    def running():
        nonlocal doc
        doc = stack.get(f"/status/{job_id}").json()
        return doc["state"] == "running"

    wait_until(running, 20, f"job {job_id} did not start")
    connection = stack.redis()
    workers = rq.Worker.all(connection=connection, queue=rq.Queue(stack.queue_name, connection=connection))
    return next(w.pid for w in workers if w.name == doc["worker"])


def test_killed_worker_is_replaced_and_its_job_retried(make_stack):
    s = make_stack(workers=2)
    job_id = s.submit({"code": SLOW_JOB.format(seconds=1.5), "retries": 1})
    victim = running_worker_pid(s, job_id)
    os.kill(victim, signal.SIGKILL)
    doc = s.wait_terminal(job_id, timeout_s=30)
    assert doc["state"] == "completed" and doc["result"] == "slept"
    assert doc["attempts"] == 2
    assert doc["attempt_errors"][0]["type"] == "worker_lost"
    wait_until(lambda: len(s.live_workers()) == 2 and victim not in s.worker_pids(), 20,
               "the pool did not replace the killed worker")
    assert "replacing it" in s.log("pool")


def test_lost_worker_with_no_retries_left_fails_the_job_as_worker_lost(make_stack):
    s = make_stack(workers=1)
    job_id = s.submit({"code": SLOW_JOB.format(seconds=5), "retries": 0})
    os.kill(running_worker_pid(s, job_id), signal.SIGKILL)
    doc = s.wait_terminal(job_id, timeout_s=20)
    assert doc["state"] == "failed" and doc["error"]["type"] == "worker_lost"


def test_sigterm_lets_the_running_job_finish(make_stack):
    s = make_stack(workers=1)
    job_id = s.submit({"code": SLOW_JOB.format(seconds=1.5), "retries": 0})
    running_worker_pid(s, job_id)
    s.pool.send_signal(signal.SIGTERM)
    assert s.pool.wait(timeout=30) == 0
    doc = s.get(f"/status/{job_id}").json()
    assert doc["state"] == "completed" and doc["result"] == "slept"
    assert s.live_workers() == []


def test_sigint_like_ctrl_c_stops_everything_gently(make_stack):
    s = make_stack(workers=2)
    job_id = s.submit({"code": SLOW_JOB.format(seconds=1), "retries": 0})
    running_worker_pid(s, job_id)
    os.killpg(s.pool.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
    assert s.pool.wait(timeout=30) == 0
    assert s.get(f"/status/{job_id}").json()["state"] == "completed"
    assert s.live_workers() == []


def test_a_job_longer_than_the_grace_period_is_handed_back_not_left_running(make_stack):
    s = make_stack(workers=1, shutdown_grace_s=0.5)
    job_id = s.submit({"code": SLOW_JOB.format(seconds=20), "timeout_s": 30, "retries": 1})
    running_worker_pid(s, job_id)
    s.pool.send_signal(signal.SIGTERM)
    s.pool.wait(timeout=30)
    doc = s.get(f"/status/{job_id}").json()
    assert doc["state"] == "submitted", doc  # waiting for a worker again, with the loss recorded
    assert doc["attempt_errors"][0]["type"] == "worker_lost"


def test_output_flood_and_crash_do_not_harm_the_worker(make_stack):
    s = make_stack(workers=1)
    chatty = s.wait_terminal(s.submit({"code": "for _ in range(20000): print('y' * 100)\nreturn 'chatty'"}))
    assert chatty["state"] == "completed" and chatty["result"] == "chatty"
    assert "[sless: output truncated" in chatty["stdout"] and len(chatty["stdout"]) < 70_000
    flood = s.wait_terminal(s.submit({"code": "while True: print('y' * 1000)", "retries": 2}))
    assert flood["state"] == "failed" and flood["error"]["type"] == "output_limit" and flood["attempts"] == 1
    crash = s.wait_terminal(s.submit({"code": "import os; os.kill(os.getpid(), 11)", "retries": 0}))
    assert crash["state"] == "failed" and crash["error"]["type"] == "crashed"
    assert s.wait_terminal(s.submit({"code": "return 'still serving'"}))["result"] == "still serving"
    assert s.pool.poll() is None and len(s.live_workers()) == 1


def test_worker_logs_one_readable_line_per_event(make_stack):
    s = make_stack(workers=1)
    s.wait_terminal(s.submit({"code": "return input * 2", "input": 21}))
    s.wait_terminal(s.submit({"code": "raise ValueError('boom')", "retries": 1}))
    s.wait_terminal(s.submit({"code": "while True: pass", "timeout_s": 0.3, "retries": 0}))
    wait_until(lambda: "timed out:" in s.log("pool"), 5, "the last outcome was not logged (its line follows the record)")
    log = s.log("pool")
    assert "started, attempt 1/3, input 21" in log
    assert "completed in" in log and "result 42" in log
    assert "failed (exception): ValueError: boom. Retry 2/2 scheduled in" in log
    assert "failed (exception): ValueError: boom. No retries left." in log
    assert "timed out: The attempt ran past its 0.3 s time limit and was killed. No retries left." in log


def test_json_log_format(make_stack):
    s = make_stack(workers=1, log_format="json")
    job_id = s.submit({"code": "return 1"})
    s.wait_terminal(job_id)
    entries, done = [], []

    def logged() -> bool:  # the line follows the record
        entries[:] = [json.loads(line) for line in s.log("pool").splitlines() if line.startswith("{")]
        done[:] = [e for e in entries if e.get("job_id") == job_id and e.get("state") == "completed"]
        return bool(done)

    wait_until(logged, 5, "the outcome was not logged")
    assert done[0]["attempt"] == 1 and done[0]["duration_ms"] > 0 and done[0]["worker"]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_workers_refuse_to_start_without_bubblewrap(stack):
    """No bwrap on PATH: every worker refuses with how to fix it, and `sless worker` exits 11."""
    done = stack.cli("worker", "--count", "1", env={"PATH": "/nonexistent"}, timeout=60)
    assert done.returncode == 11, done.stderr[-2000:]
    assert "bubblewrap (bwrap) is not installed" in done.stderr and "apt-get install bubblewrap" in done.stderr
    assert "--insecure-no-sandbox" in done.stderr


def test_a_plain_rq_worker_cannot_run_a_sless_message():
    """Messages name `run_job` for RQ's sake; outside `sless worker` it refuses, so no code runs unsandboxed."""
    from sless_daemon.worker import run_job

    with pytest.raises(RuntimeError, match="sless worker"):
        run_job({"job_id": "x", "attempt": 1, "code": "return 1"})


def test_an_idle_worker_holds_no_lease_and_a_busy_one_only_its_own(make_stack):
    """Settled attempts' leases are dropped in batches; once the queue is empty none is left,
    so the pool's count of busy workers (autoscaling) sees idle workers as idle. (Claims at
    once: a quiet short attempt held back would take no lease at all.)"""
    stack = make_stack(workers=1, claim_hold_s=0)
    leases = stack.mongo_jobs().database["leases"]
    ids = [stack.submit({"code": "return input", "input": n}) for n in range(12)]
    assert [stack.wait_terminal(job_id)["state"] for job_id in ids] == ["completed"] * 12
    assert stack.mongo_jobs().database["events"].count_documents({"step": "claim"}) == 12
    # an idle worker drops them at once; DROP_AFTER_S (0.5 s) is the backstop
    wait_until(lambda: leases.count_documents({}) == 0, 5.0, "leases of settled attempts were not dropped")
    running = stack.submit({"code": "import time\ntime.sleep(1.5)\nreturn 1"})
    wait_until(lambda: stack.get(f"/status/{running}").json()["state"] == "running", 10, "the job did not start")
    assert [lease["job_id"] for lease in leases.find({})] == [running]


def test_a_quiet_short_attempt_is_claimed_with_its_settle_and_takes_no_lease(make_stack):
    """An attempt that ends within the claim hold and writes nothing costs one MongoDB write
    (claim and settle in one insert, no lease), and its message is marked finished once
    that is written; one that prints is claimed with a lease, as it runs."""
    stack = make_stack(workers=1, claim_hold_s=2)
    database, redis = stack.mongo_jobs().database, stack.redis()
    quiet = stack.submit({"code": "import time\ntime.sleep(1.5)\nreturn input * 2", "input": 21})
    wait_until(lambda: redis.zscore(f"sless:taken:{stack.queue_name}", f"{quiet}-0"), 10, "it was not taken")
    assert stack.get(f"/status/{quiet}").json()["state"] == "submitted"  # running, but nothing is written yet
    assert database["leases"].count_documents({"job_id": quiet}) == 0
    assert stack.wait_terminal(quiet)["result"] == 42
    assert sorted(e["step"] for e in database["events"].find({"job_id": quiet})) == ["claim", "settle"]
    [claim] = database["events"].find({"job_id": quiet, "step": "claim"})
    assert claim["owner"] == stack.live_workers()[0]
    wait_until(lambda: redis.hget(f"rq:job:{quiet}-0", "status") == b"finished", 5, "its message was not marked")
    assert redis.zscore(f"sless:taken:{stack.queue_name}", f"{quiet}-0") is None
    assert 0 < redis.ttl(f"rq:job:{quiet}-0") <= 600
    wait_until(lambda: "started, attempt 1/3, input 21" in stack.log("pool"), 5, "no start logged")
    talker = stack.submit({"code": "print('hi')\nreturn 1"})  # its output goes out once its claim stands
    assert stack.wait_terminal(talker)["stdout"] == "hi\n"
    feed = stack.get(f"/events/{talker}", params={"wait_s": 0}).json()["events"]
    assert [(e["kind"], e.get("state") or e.get("text")) for e in feed] == \
           [("state", "running"), ("output", "hi\n"), ("state", "completed")]


def test_a_duplicate_message_runs_nowhere_visible_and_changes_nothing(make_stack):
    """A worker runs an attempt while its claim is being written (AttemptRunner): a message
    for an attempt that already ran fails its claim, and that run publishes nothing (no
    "running", no output in the feed) and records nothing; the worker says so in its log."""
    from sless_daemon.queue import JobQueue

    stack = make_stack(workers=1)
    job_id = stack.submit({"code": "print('once')\nreturn input + 1", "input": 6})
    before = stack.wait_terminal(job_id)
    assert before["state"] == "completed" and before["result"] == 7 and before["stdout"] == "once\n"
    feed = []

    def feed_has_the_end() -> bool:  # the settle is announced to the feed just after it is recorded
        feed[:] = stack.get(f"/events/{job_id}", params={"wait_s": 0}).json()["events"]
        return any(entry.get("state") == "completed" for entry in feed)

    wait_until(feed_has_the_end, 5, "the feed did not get the job's end")
    stored = stack.mongo_jobs().find_one({"_id": job_id})
    JobQueue(stack.redis(), stack.queue_name).resend(stored, 0)  # attempt 1 again
    wait_until(lambda: f"job {job_id}: attempt 1 was taken before" in stack.log("pool"), 10,
               "the worker did not take the duplicate message")
    assert stack.get(f"/events/{job_id}", params={"wait_s": 0}).json()["events"] == feed
    after = stack.get(f"/status/{job_id}").json()
    assert {k: after[k] for k in ("state", "result", "attempts", "stdout", "finished_at")} == \
           {k: before[k] for k in ("state", "result", "attempts", "stdout", "finished_at")}
    database = stack.mongo_jobs().database
    assert database["events"].count_documents({"job_id": job_id}) == 2  # its claim, its settle
    # no lease is left: the first attempt's is dropped with the next batch (an idle worker drops
    # at once), and the duplicate's, if its insert came after that, went with its failed claim
    wait_until(lambda: database["leases"].count_documents({"job_id": job_id}) == 0, 5, "a lease was left behind")


def test_a_duplicate_of_a_quiet_attempt_is_discarded_with_its_claim(make_stack):
    """A quiet short attempt is claimed with its settle: a duplicate message for it runs in
    its sandbox, finds the claim taken when it writes both, and records nothing; its
    message is still marked handled."""
    from sless_daemon.queue import JobQueue

    stack = make_stack(workers=1, claim_hold_s=2)  # a long hold: no lease even on a loaded machine
    job_id = stack.submit({"code": "return input + 1", "input": 6})
    before = stack.wait_terminal(job_id)
    database, redis = stack.mongo_jobs().database, stack.redis()
    assert sorted(e["step"] for e in database["events"].find({"job_id": job_id})) == ["claim", "settle"]
    JobQueue(redis, stack.queue_name).resend(stack.mongo_jobs().find_one({"_id": job_id}), 0)
    wait_until(lambda: f"job {job_id}: attempt 1 was taken before" in stack.log("pool"), 10,
               "the worker did not take the duplicate message")
    assert database["events"].count_documents({"job_id": job_id}) == 2
    assert {k: stack.get(f"/status/{job_id}").json()[k] for k in ("state", "result", "finished_at", "worker")} == \
           {k: before[k] for k in ("state", "result", "finished_at", "worker")}
    wait_until(lambda: redis.zcard(f"sless:taken:{stack.queue_name}") == 0, 5, "the duplicate stayed taken")
    assert stack.log("pool").count(f"job {job_id} completed") == 1


def test_without_a_sandbox_a_duplicate_message_does_not_run_at_all(make_stack, tmp_path):
    """Unsandboxed (--insecure-no-sandbox) code can touch the host, so there the claim is
    written before the code runs: a duplicate leaves no trace, not even in a file."""
    from sless_daemon.queue import JobQueue

    stack = make_stack(workers=1, pool_args=("--insecure-no-sandbox",))
    marks = tmp_path / "runs.txt"
    job_id = stack.submit({"code": f"open({str(marks)!r}, 'a').write('run\\n')\nreturn 1"})
    assert stack.wait_terminal(job_id)["state"] == "completed"
    assert marks.read_text() == "run\n"
    JobQueue(stack.redis(), stack.queue_name).resend(stack.mongo_jobs().find_one({"_id": job_id}), 0)
    wait_until(lambda: f"job {job_id}: attempt 1 was taken before" in stack.log("pool"), 10,
               "the worker did not take the duplicate message")
    assert marks.read_text() == "run\n"


def test_a_message_the_worker_cannot_read_fails_its_attempt_once(make_stack):
    """A message whose job cannot be read (here its limits are garbled) fails its attempt as
    crashed, instead of being left unclaimed for the orphan check to send again forever."""
    from sless_daemon.queue import JobQueue

    stack = make_stack(workers=0)
    job_id = stack.submit({"code": "return 1", "retries": 0})
    stack.redis().delete(f"rq:queue:{stack.queue_name}")  # the good message is gone...
    garbled = {**stack.mongo_jobs().find_one({"_id": job_id}), "limits": {"garbled": True}}
    JobQueue(stack.redis(), stack.queue_name).resend(garbled, 0)  # ...and a garbled one waits
    stack.workers = 1
    stack.start_pool()
    doc = stack.wait_terminal(job_id, timeout_s=20)
    assert doc["state"] == "failed" and doc["attempts"] == 1
    assert doc["error"]["type"] == "crashed" and "could not be read" in doc["error"]["message"]
