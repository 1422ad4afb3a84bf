"""State changes against the real MongoDB-wire server and Redis, without processes.

These pin down the rules every process relies on: a job is claimed once, a stale
attempt cannot write, a due retry is enqueued once however many sweepers run. The last
tests drive a worker's attempt runner by hand, with a real sandbox, for when it writes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from datetime import timedelta

import pytest
import rq
from rq.serializers import JSONSerializer

from sless_daemon.errors import BadRequest
from sless_daemon.executor import AttemptOutcome, failed
from sless_daemon.lifecycle import Lifecycle, utcnow
from sless_daemon.limits import resolve
from sless_daemon.queue import SETTLED_KEY, JobQueue, connect_redis, message_id
from sless_daemon.settings import Settings
from sless_daemon.spec import JobSpec
from sless_daemon.states import ErrorType, JobState
from sless_daemon.store import OutcomeStore, connect_mongo
from stack import MONGO_URL, REDIS_URL, wait_until

SPEC = JobSpec(code="return 1", input={"n": 1}, limits=resolve({"timeout_s": 1.0, "memory_mb": 64}, Settings()),
               retries=1)


@pytest.fixture
def lifecycle():
    settings = Settings.from_env({}, retry_backoff_s=0.0, mongo_db=f"sless_test_{uuid.uuid4().hex[:8]}")
    store = OutcomeStore(connect_mongo(MONGO_URL), settings.mongo_db)
    store.ensure_indexes()
    queue = JobQueue(connect_redis(REDIS_URL), f"test-{uuid.uuid4().hex[:8]}")
    yield Lifecycle(settings, store, queue, owner="test")
    store.client.drop_database(settings.mongo_db)
    queue.rq_queue.empty()
    queue.connection.delete(queue.taken_key)


def orphan(lifecycle: Lifecycle, submitted_at=None) -> str:
    """A job recorded whose message Redis no longer has (a daemon died before enqueuing it, or
    Redis lost it), stamped `submitted_at` when given; its id."""
    job_id = lifecycle.accept(SPEC)
    lifecycle.queue.connection.delete(f"rq:job:{job_id}-0")
    lifecycle.queue.rq_queue.empty()
    if submitted_at is not None:
        lifecycle.store.jobs.update_one({"_id": job_id}, {"$set": {"submitted_at": submitted_at}})
    return job_id


def message(lifecycle: Lifecycle, job_id: str, attempts: int = 0) -> dict:
    """The queue message for the attempt after `attempts`, as a worker would receive it."""
    job = rq.job.Job.fetch(message_id(job_id, attempts), connection=lifecycle.queue.connection,
                           serializer=JSONSerializer)
    return job.args[0]


def lease_of(lifecycle: Lifecycle, worker: str) -> dict:
    [lease] = lifecycle.store.leases_of(worker)
    return lease


def test_indexes_for_time_events_and_sweeps(lifecycle):
    def keys(collection):
        return [tuple(k for k, _ in index["key"]) for index in collection.index_information().values()]

    store = lifecycle.store
    assert ("submitted_at",) in keys(store.jobs) and ("job_id",) in keys(store.events)
    assert ("until",) in keys(store.leases) and ("worker",) in keys(store.leases) and ("at",) in keys(store.retries)


def test_the_message_carries_the_attempt(lifecycle):
    job_id = lifecycle.accept(SPEC)
    sent = message(lifecycle, job_id)
    assert sent["job_id"] == job_id and sent["attempt"] == 1 and sent["code"] == SPEC.code
    assert sent["input_json"] == '{"n": 1}' and sent["limits"] == SPEC.limits.to_dict() and sent["retries"] == 1


def test_accept_records_then_enqueues(lifecycle):
    job_id = lifecycle.accept(SPEC)
    assert lifecycle.store.get(job_id)["state"] == "submitted"
    assert lifecycle.queue.depth() == 1


def test_a_redelivered_job_is_claimed_once(lifecycle):
    job_id = lifecycle.accept(SPEC)
    sent = message(lifecycle, job_id)
    first = lifecycle.start(sent)
    assert first["attempts"] == 1 and lifecycle.store.get(job_id)["state"] == "running"
    assert other_worker(lifecycle).start(sent) is None
    lifecycle.finish(first, AttemptOutcome(result=5, duration_ms=1.0))
    assert other_worker(lifecycle).start(sent) is None
    assert lifecycle.start(sent) is None  # not even by the worker that ran it
    assert lifecycle.store.leases.count_documents({}) == 0
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "completed" and doc["attempts"] == 1 and doc["result_json"] == "5"


def test_a_stale_attempt_cannot_overwrite_a_newer_one(lifecycle):
    job_id = lifecycle.accept(SPEC)
    old_worker, sweeper, new_worker = (other_worker(lifecycle, name) for name in ("w1", "sweeper", "w2"))
    stale = old_worker.start(message(lifecycle, job_id))
    sweeper.lose(lease_of(lifecycle, "w1"), "worker w1 vanished")  # given up on: back to waiting, retry due now
    assert sweeper.enqueue_due_retries() == 1
    fresh = new_worker.start(message(lifecycle, job_id, 1))
    assert fresh["attempts"] == 2
    old_worker.finish(stale, AttemptOutcome(result="stale", duration_ms=1.0))  # the old worker comes back
    new_worker.finish(fresh, AttemptOutcome(result="fresh", duration_ms=1.0))
    doc = lifecycle.store.get(job_id)
    assert doc["result_json"] == '"fresh"' and doc["attempts"] == 2
    assert [e["type"] for e in doc["attempt_errors"]] == ["worker_lost"]


def test_failed_attempts_retry_then_fail_for_good(lifecycle):
    job_id = lifecycle.accept(SPEC)
    error = failed(ErrorType.EXCEPTION, "ValueError: x")
    decision = lifecycle.finish(lifecycle.start(message(lifecycle, job_id)), AttemptOutcome(error=error, duration_ms=1.0))
    assert decision.retry
    assert lifecycle.store.get(job_id)["state"] == JobState.SUBMITTED
    lifecycle.enqueue_due_retries()
    decision = lifecycle.finish(lifecycle.start(message(lifecycle, job_id, 1)),
                                AttemptOutcome(error=error, duration_ms=1.0))
    assert not decision.retry
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "failed" and doc["attempts"] == 2 and len(doc["attempt_errors"]) == 2


def test_a_due_retry_is_enqueued_once_by_concurrent_sweepers(lifecycle):
    ids = []
    for _ in range(20):
        job_id = lifecycle.accept(SPEC)
        lifecycle.start(message(lifecycle, job_id))
        lifecycle.queue.rq_queue.empty()
        lifecycle.lose(lease_of(lifecycle, "test"), "gone")
        ids.append(job_id)
    counts = []
    sweepers = [other_worker(lifecycle, f"sweeper{i}") for i in range(4)]
    threads = [threading.Thread(target=lambda s=s: counts.append(s.enqueue_due_retries())) for s in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 20 and lifecycle.queue.depth() == 20


def test_a_retry_taken_by_a_sweeper_that_died_is_sent_a_lease_later(lifecycle):
    """A sweeper that took a retry (its /enqueue event) and died before enqueuing it: the due
    retries' sweep sends it once it was taken a lease ago, not before, and only once."""
    job_id = lifecycle.accept(SPEC)
    lifecycle.finish(lifecycle.start(message(lifecycle, job_id)), AttemptOutcome(error=failed(ErrorType.TIMEOUT, "t")))
    lifecycle.queue.rq_queue.empty()
    assert lifecycle.store.take_retry(job_id, 1, "pool.dead-host.1")  # ...and then it died
    assert lifecycle.enqueue_due_retries() == 0 and lifecycle.queue.depth() == 0  # on its way, as far as we know
    lease_ago = utcnow() - timedelta(seconds=lifecycle.settings.lease_s + 1)
    lifecycle.store.retries.update_many({}, {"$set": {"at": lease_ago}})  # due long ago, but taken just now:
    assert lifecycle.enqueue_due_retries() == 0 and lifecycle.queue.depth() == 0  # still on its way
    lifecycle.store.events.update_many({"job_id": job_id, "step": "enqueue"}, {"$set": {"at": lease_ago}})
    assert lifecycle.enqueue_due_retries() == 1 and lifecycle.queue.depth() == 1
    assert lifecycle.enqueue_due_retries() == 0 and lifecycle.queue.depth() == 1  # forgotten: sent once


def test_a_retry_sent_by_a_sweeper_that_died_before_forgetting_it_is_not_sent_again(lifecycle):
    job_id = lifecycle.accept(SPEC)
    lifecycle.finish(lifecycle.start(message(lifecycle, job_id)), AttemptOutcome(error=failed(ErrorType.TIMEOUT, "t")))
    lifecycle.queue.rq_queue.empty()
    assert lifecycle.store.take_retry(job_id, 1, "pool.dead-host.1")
    lifecycle.queue.enqueue(lifecycle.store.get(job_id), 1)  # ...it sent it, and died before forgetting it
    lease_ago = utcnow() - timedelta(seconds=lifecycle.settings.lease_s + 1)
    lifecycle.store.events.update_many({"job_id": job_id, "step": "enqueue"}, {"$set": {"at": lease_ago}})
    lifecycle.enqueue_due_retries()
    assert lifecycle.queue.depth() == 1 and lifecycle.store.retries.count_documents({}) == 0


def test_a_daemon_looks_again_at_what_its_predecessor_recorded_last(lifecycle):
    """Its start scan is too early for a job recorded in the grace before it started (the
    previous daemon died before enqueuing it): a grace later, those jobs are looked at."""
    from sless_daemon.recovery import Recovery

    job_id = orphan(lifecycle)  # never enqueued
    recovery = Recovery(lifecycle)  # the new daemon's sweeper, started at once
    assert recovery.sweep()["orphans"] == 0  # the start scan: younger than the grace, not an orphan yet
    _, young = recovery.second_look
    assert [job["_id"] for job in young] == [job_id]
    recovery.second_look = (0.0, young)  # a grace later
    assert recovery.sweep()["orphans"] == 1 and lifecycle.queue.depth() == 1
    assert recovery.second_look is None


def test_a_scan_as_redis_forgot_looks_again_at_what_was_sent_last(lifecycle):
    """A job enqueued just before Redis lost its data is too young for the scan that follows
    (it may be on its way still): a grace later it is looked at again, and sent."""
    from sless_daemon.recovery import MARKER_KEY, Recovery

    pool = Recovery(lifecycle, full_scan_at_start=False)
    pool.sweep()
    orphan(lifecycle)  # enqueued; then Redis loses its data
    lifecycle.queue.connection.delete(MARKER_KEY)
    assert pool.sweep()["orphans"] == 0 and lifecycle.queue.depth() == 0
    _, young = pool.second_look
    pool.second_look = (0.0, young)  # a grace later
    assert pool.sweep()["orphans"] == 1 and lifecycle.queue.depth() == 1
    assert pool.sweep().get("orphans", 0) == 0 and lifecycle.queue.depth() == 1  # sent once


def test_every_orphan_is_sent_however_many_wait(lifecycle, monkeypatch):
    """Redis is asked about the waiting jobs a batch at a time, and every batch is looked at."""
    from sless_daemon import recovery

    monkeypatch.setattr(recovery, "ORPHAN_BATCH", 2)  # 2,000 in use: five jobs make three batches
    minute_ago = utcnow() - timedelta(minutes=1)
    for _ in range(5):
        orphan(lifecycle, minute_ago)
    assert recovery.Recovery(lifecycle).sweep()["orphans"] == 5 and lifecycle.queue.depth() == 5


def test_a_job_stamped_by_a_clock_a_little_ahead_is_looked_at_again(lifecycle):
    """Another host's clock ran half a second ahead of the sweeper's: the job is young, not skipped."""
    from sless_daemon.recovery import Recovery

    job_id = orphan(lifecycle, utcnow() + timedelta(seconds=0.5))
    recovery = Recovery(lifecycle)
    assert recovery.sweep()["orphans"] == 0
    _, young = recovery.second_look
    assert [job["_id"] for job in young] == [job_id]


def test_the_sweep_goes_on_where_redis_refuses_info(lifecycle):
    """Managed Redis may refuse `INFO` (an ACL): no run id to compare, the rest as usual."""
    from sless_daemon.recovery import Recovery

    user = f"sless-test-{uuid.uuid4().hex[:8]}"
    admin = lifecycle.queue.connection
    admin.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all", "-info")
    try:
        refused = JobQueue(connect_redis(REDIS_URL.replace("redis://", f"redis://{user}:secret@")), lifecycle.queue.name)
        assert refused.server_run() is None and lifecycle.queue.server_run()
        here = Lifecycle(lifecycle.settings, lifecycle.store, refused, owner="test")
        recovery = Recovery(here)
        assert "lost" in recovery.sweep() and "lost" in recovery.sweep()  # not paused: {} is a sweep that was
    finally:
        admin.execute_command("ACL", "DELUSER", user)


def test_a_pool_reads_every_job_at_start_only_when_redis_lost_its_data(lifecycle):
    """A pool's sweeper leaves the full scan to the daemon while Redis kept its data, and
    scans at once when Redis forgot (its marker gone)."""
    from sless_daemon.recovery import MARKER_KEY, Recovery

    Recovery(lifecycle).sweep()  # an earlier sweeper left its marker: Redis kept its data since
    orphan(lifecycle, utcnow() - timedelta(minutes=1))  # as a daemon dying before enqueue leaves
    pool = Recovery(lifecycle, full_scan_at_start=False)
    assert pool.sweep()["orphans"] == 0
    assert lifecycle.queue.depth() == 0
    # Redis lost its data. The pool's sweeper saw the marker before, so it tells even if another
    # sweeper (a test stack's, on this Redis) sets a new marker first.
    lifecycle.queue.connection.delete(MARKER_KEY)
    assert pool.sweep()["orphans"] == 1
    assert lifecycle.queue.depth() == 1


def test_a_scan_after_redis_forgot_stays_due_until_one_goes_through(lifecycle, monkeypatch):
    from sless_daemon.errors import DependencyDown
    from sless_daemon.recovery import MARKER_KEY, Recovery

    recovery = Recovery(lifecycle, full_scan_at_start=False)
    recovery.sweep()
    orphan(lifecycle, utcnow() - timedelta(minutes=1))
    lifecycle.queue.connection.delete(MARKER_KEY)  # Redis lost its data

    def refused(*args):
        raise DependencyDown("MongoDB", "gone")

    with monkeypatch.context() as patched:
        patched.setattr(lifecycle.store, "waiting", refused)
        assert recovery.sweep() == {}  # the scan failed: MongoDB away
    assert recovery.sweep()["orphans"] == 1  # the marker is back in place, the scan still due
    assert lifecycle.queue.depth() == 1


def test_a_retry_waits_for_its_time(lifecycle):
    job_id = lifecycle.accept(SPEC)
    lifecycle.finish(lifecycle.start(message(lifecycle, job_id)), AttemptOutcome(error=failed(ErrorType.TIMEOUT, "t")))
    later = utcnow() + timedelta(hours=1)
    lifecycle.store.retries.update_many({}, {"$set": {"at": later}})
    assert lifecycle.enqueue_due_retries() == 0
    lifecycle.store.retries.update_many({}, {"$set": {"at": utcnow()}})
    assert lifecycle.enqueue_due_retries() == 1


def test_settling_is_reentrant_for_its_owner(lifecycle):
    """A worker whose outcome write failed half-way can write it again."""
    job_id = lifecycle.accept(SPEC)
    job = lifecycle.start(message(lifecycle, job_id))
    assert lifecycle.store.settle(job_id, 1, {"state": "completed", "result_json": "1"}, None, "test")
    assert lifecycle.store.settle(job_id, 1, {"state": "completed", "result_json": "1"}, None, "test")
    assert not lifecycle.store.settle(job_id, 1, {"state": "failed"}, None, "someone-else")
    assert lifecycle.store.get(job_id)["state"] == "completed" and job["attempts"] == 1


def test_a_worker_that_died_after_recording_leaves_the_outcome_alone(lifecycle):
    """The worker recorded its outcome and died before dropping its lease: the sweep only drops it."""
    from sless_daemon.recovery import Recovery

    job_id = lifecycle.accept(SPEC)
    lifecycle.start(message(lifecycle, job_id))
    assert lifecycle.store.settle(job_id, 1, {"state": "completed", "result_json": "7"}, None, "test")
    lifecycle.store.leases.update_many({}, {"$set": {"until": utcnow() - timedelta(seconds=1)}})
    assert Recovery(other_worker(lifecycle, "sweeper")).sweep()["lost"] == 0
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "completed" and doc["result_json"] == "7" and doc["attempt_errors"] == []
    assert lifecycle.store.leases.count_documents({}) == 0


def test_an_expired_lease_is_settled_as_lost_and_retried(lifecycle):
    from sless_daemon.recovery import Recovery

    job_id = lifecycle.accept(SPEC)
    lifecycle.start(message(lifecycle, job_id))
    lifecycle.store.leases.update_many({}, {"$set": {"until": utcnow() - timedelta(seconds=1)}})
    assert Recovery(other_worker(lifecycle, "sweeper")).sweep()["lost"] == 1
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "submitted" and [e["type"] for e in doc["attempt_errors"]] == ["worker_lost"]


def test_a_lost_message_is_enqueued_again(lifecycle):
    from sless_daemon.recovery import Recovery

    orphan(lifecycle, utcnow() - timedelta(minutes=1))  # as if Redis restarted without persistence
    assert Recovery(lifecycle).sweep()["orphans"] == 1
    assert lifecycle.queue.depth() == 1
    assert Recovery(lifecycle).sweep()["orphans"] == 0  # now queued: left alone


def test_a_redis_restart_that_kept_its_data_is_caught_up_on(lifecycle, tmp_path):
    """Redis restarted from its append-only file keeps the marker but may have lost its last
    second of writes (an enqueue among them): the sweep scans every job, as when Redis
    forgot all."""
    from services import PrivateRedis
    from sless_daemon.recovery import Recovery

    redis = PrivateRedis(tmp_path / "redis", persistent=True).start()
    try:
        queue = JobQueue(connect_redis(redis.url), "restart")
        here = Lifecycle(lifecycle.settings, lifecycle.store, queue, owner="test")
        recovery = Recovery(here)
        recovery.sweep()  # the marker is set, and this server's run seen
        job_id = here.accept(SPEC)
        queue.connection.delete(f"rq:job:{job_id}-0")  # the enqueue the crash lost
        queue.rq_queue.empty()
        here.store.jobs.update_one({"_id": job_id}, {"$set": {"submitted_at": utcnow() - timedelta(minutes=1)}})
        time.sleep(1.5)  # everysec: the marker and the removals are on disk
        recovery.next_full_scan = recovery.next_orphan_scan = float("inf")  # only a restart may scan now
        assert "orphans" not in recovery.sweep()
        redis.kill()
        redis.start()
        assert recovery.sweep()["orphans"] == 1  # the one that saw the old server scans
        assert queue.depth() == 1
    finally:
        redis.kill()


def other_worker(lifecycle: Lifecycle, name: str = "w2") -> Lifecycle:
    """The same store and queue, seen from another process."""
    return Lifecycle(lifecycle.settings, lifecycle.store, lifecycle.queue, owner=name)


def test_concurrent_workers_claim_each_attempt_once(lifecycle):
    ids = [lifecycle.accept(SPEC) for _ in range(30)]
    sent_messages = [message(lifecycle, job_id) for job_id in ids]
    wins: list[str] = []
    workers = [other_worker(lifecycle, f"w{i}") for i in range(4)]

    def claim_all(worker: Lifecycle) -> None:
        wins.extend(sent["job_id"] for sent in sent_messages if worker.start(sent) is not None)

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(ids)


def test_outcomes_recorded_together_each_win_or_lose_on_their_own(lifecycle):
    """The recorder writes several outcomes in one insert; one settled elsewhere does not sink the rest."""
    ids = [lifecycle.accept(SPEC) for _ in range(3)]
    jobs = [lifecycle.start(message(lifecycle, job_id)) for job_id in ids]
    assert other_worker(lifecycle, "sweeper").store.settle(ids[1], 1, {"state": "failed"}, None, "sweeper")
    decisions = lifecycle.finish_many([(job, AttemptOutcome(result=i, duration_ms=1.0), None)
                                       for i, job in enumerate(jobs)])
    assert [d.retry for d in decisions] == [False, False, False]
    docs = [lifecycle.store.get(job_id) for job_id in ids]
    assert [d["state"] for d in docs] == ["completed", "failed", "completed"]
    assert docs[0]["result_json"] == "0" and docs[2]["result_json"] == "2"
    assert lifecycle.store.leases.count_documents({}) == 0


def test_claims_written_with_their_settles_each_win_or_lose_on_their_own(lifecycle):
    """Attempts that ended before their claim was written (worker.AttemptRunner) go in as
    claim-then-settle in one ordered insert: one whose attempt another worker claimed first
    (a duplicate message) is discarded, its settle never written, and the others stand."""
    ids = [lifecycle.accept(SPEC) for _ in range(3)]
    jobs = [lifecycle.attempt_of(message(lifecycle, job_id)) for job_id in ids]
    assert other_worker(lifecycle, "other").start(message(lifecycle, ids[1])) is not None  # runs it there
    decisions = lifecycle.finish_many([(job, AttemptOutcome(result=i, duration_ms=1.0), None)
                                       for i, job in enumerate(jobs)], claims=["r0", "r1", "r2"])
    assert [d.recorded for d in decisions] == [True, False, True]
    docs = [lifecycle.store.get(job_id) for job_id in ids]
    assert [d["state"] for d in docs] == ["completed", "running", "completed"]
    assert docs[0]["result_json"] == "0" and docs[1]["result_json"] is None and docs[2]["result_json"] == "2"
    assert [lifecycle.store.taken_by(job_id, 1, "claim") for job_id in ids] == ["test", "other", "test"]
    assert [lease["job_id"] for lease in lifecycle.store.leases.find({})] == [ids[1]]


def test_a_cancel_before_the_claim_wins_over_an_attempt_that_ended_meanwhile(lifecycle):
    """A job whose attempt runs with its claim held back looks waiting: a cancel fences it,
    and the attempt's outcome, written later with its claim, is discarded."""
    job_id = lifecycle.accept(SPEC)
    job = lifecycle.attempt_of(message(lifecycle, job_id))
    assert lifecycle.cancel(job_id)[1]
    assert not lifecycle.finish_many([(job, AttemptOutcome(result=1), None)], claims=["r"])[0].recorded
    assert lifecycle.store.get(job_id)["state"] == "cancelled"


def test_a_claim_with_settle_written_again_finds_its_own_claim(lifecycle):
    """The answer to a claim-and-settle insert was lost and the recorder writes it again: the
    claim its run wrote lets its settle go in; if that went in too, the stored outcome
    stands. Another run's claim, even by the same worker (a duplicate message), does not."""
    from sless_daemon.store import step_event

    first, second = lifecycle.accept(SPEC), lifecycle.accept(SPEC)
    halfway = lifecycle.attempt_of(message(lifecycle, first))
    lifecycle.store.events.insert_one(step_event(first, 1, "claim", lifecycle.owner, run="r1"))  # only the claim
    assert lifecycle.finish_many([(halfway, AttemptOutcome(result="a"), None)], claims=["r1"])[0].recorded
    assert lifecycle.store.get(first)["result_json"] == '"a"'
    whole = lifecycle.attempt_of(message(lifecycle, second))
    lifecycle.finish_many([(whole, AttemptOutcome(result="b"), None)], claims=["r2"])
    again = lifecycle.finish_many([(whole, AttemptOutcome(result="c"), None)], claims=["r2"])[0]
    assert again.recorded and lifecycle.store.get(second)["result_json"] == '"b"'
    duplicate = lifecycle.finish_many([(whole, AttemptOutcome(result="d"), None)], claims=["r3"])[0]
    assert not duplicate.recorded and lifecycle.store.get(second)["result_json"] == '"b"'


def test_a_withdrawn_job_never_runs_even_if_its_message_got_through(lifecycle):
    """The enqueue reached Redis but its answer was lost: the caller got a 503, so no worker may run it."""
    job_id = lifecycle.accept(SPEC)
    sent = message(lifecycle, job_id)
    lifecycle.store.withdraw(job_id)
    assert lifecycle.store.get(job_id) is None
    assert lifecycle.start(sent) is None


def test_a_failed_job_is_reopened_once(lifecycle):
    job_id = lifecycle.accept(dataclasses.replace(SPEC, retries=0))
    lifecycle.finish(lifecycle.start(message(lifecycle, job_id)), AttemptOutcome(error=failed(ErrorType.EXCEPTION, "x")))
    assert lifecycle.reopen(job_id)["state"] == "submitted"
    with pytest.raises(BadRequest) as second:
        lifecycle.reopen(job_id)  # the same daemon again: refused, not enqueued twice
    assert second.value.status == 409


def test_a_retry_its_dead_worker_did_not_note_is_noted_by_the_sweep(lifecycle):
    from sless_daemon.recovery import Recovery

    job_id = lifecycle.accept(SPEC)
    lifecycle.start(message(lifecycle, job_id))
    # the worker settled the attempt as a retry and died before noting it in `retries`
    assert lifecycle.store.settle(job_id, 1, {"state": "submitted", "retry_at": utcnow()}, {"type": "exception"}, "test")
    lifecycle.store.leases.update_many({}, {"$set": {"until": utcnow() - timedelta(seconds=1)}})
    sweep = Recovery(other_worker(lifecycle, "sweeper")).sweep()
    assert sweep["lost"] == 0 and sweep["retries"] + lifecycle.enqueue_due_retries() == 1


def test_a_message_parked_by_a_worker_that_died_counts_as_missing(lifecycle):
    job_id = lifecycle.accept(SPEC)
    queue = lifecycle.queue
    assert queue.missing([(job_id, 0)], 10) == []  # queued: a worker will take it
    queue.connection.lmove(queue.rq_queue.key, queue.intermediate_key, "LEFT", "RIGHT")  # popped, never taken over
    assert queue.missing([(job_id, 0)], 10) == [0]


def test_a_job_recorded_whole_by_an_earlier_version_keeps_its_outcome(lifecycle):
    """Job documents updated in place (before events existed) are read as they are, not run again."""
    from sless_daemon.recovery import Recovery

    old = {"_id": "a" * 32, "state": "completed", "code": "return 1", "input_json": "1", "limits": {}, "retries": 0,
           "attempts": 1, "result_json": "2", "submitted_at": utcnow() - timedelta(minutes=5)}
    lifecycle.store.jobs.insert_one(old)
    broken = {"_id": "b" * 32, "code": "return 1", "submitted_at": utcnow() - timedelta(minutes=5)}
    lifecycle.store.jobs.insert_one(broken)  # no limits at all: cannot be sent, must not stop the sweep
    assert lifecycle.store.get("a" * 32)["state"] == "completed"
    assert Recovery(lifecycle).sweep()["orphans"] == 0


def test_a_cancel_that_stopped_after_its_fence_is_finished_by_the_next_cancel_and_by_the_sweep(lifecycle):
    """The daemon died between fencing the next attempt and settling it: the job must not wait forever."""
    from sless_daemon.lifecycle import CANCEL_FENCE
    from sless_daemon.recovery import Recovery

    by_request, by_sweep = lifecycle.accept(SPEC), lifecycle.accept(SPEC)
    for job_id in (by_request, by_sweep):
        assert lifecycle.store.fence(job_id, 1, CANCEL_FENCE)
    job, cancelled = lifecycle.cancel(by_request)
    assert cancelled and job["state"] == "cancelled"
    lifecycle.queue.rq_queue.empty()  # as after Redis lost it: the orphan scan looks at the job
    sweeper = other_worker(lifecycle, "sweeper")
    sweeper.settings = dataclasses.replace(lifecycle.settings, orphan_grace_s=0.0)
    Recovery(sweeper).requeue_orphans()
    assert lifecycle.store.get(by_sweep)["state"] == "cancelled"
    assert lifecycle.queue.rq_queue.count == 0  # nothing re-sent


def test_a_retry_that_comes_due_with_a_cancel_pending_is_cancelled_not_run(lifecycle):
    """The worker settled a retry just as the cancel arrived for the running attempt."""
    job_id = lifecycle.accept(SPEC)
    job = lifecycle.start(message(lifecycle, job_id))
    lifecycle.store.request_cancel(job_id, 1, "daemon", utcnow())
    lifecycle.queue.request_cancel(job_id, 1)
    lifecycle.queue.rq_queue.empty()
    # the retry decision was taken before the cancel was visible
    lifecycle.store.settle(job_id, 1, {"state": "submitted", "retry_at": utcnow()}, {"type": "exception"}, "test")
    lifecycle.store.schedule_retry(job_id, 1, utcnow())
    lifecycle.enqueue_due_retries()
    assert lifecycle.store.get(job_id)["state"] == "cancelled"
    assert lifecycle.queue.rq_queue.count == 0 and job["attempts"] == 1


def test_a_job_reopened_by_hand_is_sent_by_the_sweep_despite_a_cancel_of_its_failed_attempt(lifecycle):
    """A cancel asked for while the last attempt ran, which then failed by itself (failed for
    good), is no reason to cancel the run the user asked for afterwards (POST /retry): the
    retry noted when Redis refused its message (Lifecycle.reopen) is sent, not cancelled."""
    job_id = lifecycle.accept(dataclasses.replace(SPEC, retries=0))
    job = lifecycle.start(message(lifecycle, job_id))
    lifecycle.store.request_cancel(job_id, 1, "daemon", utcnow())
    lifecycle.queue.request_cancel(job_id, 1)
    lifecycle.store.settle(job_id, 1, {"state": "failed"}, {"type": "exception"}, "test")
    lifecycle.queue.rq_queue.empty()
    assert lifecycle.store.reopen(job_id, 1, "daemon", utcnow())
    lifecycle.store.schedule_retry(job_id, 1, utcnow(), reopened=True)  # as reopen does when Redis refuses
    assert lifecycle.enqueue_due_retries() == 1
    assert lifecycle.store.get(job_id)["state"] == "submitted" and job["attempts"] == 1
    assert message(lifecycle, job_id, 1)["job_id"] == job_id


def test_a_settle_written_twice_is_announced_once_and_keeps_its_first_outcome(lifecycle):
    """The recorder writes again after a failure that followed the insert: the stored event stands."""
    job_id = lifecycle.accept(SPEC)
    job = lifecycle.start(message(lifecycle, job_id))
    error = failed(ErrorType.EXCEPTION, "boom")
    first = lifecycle.finish(job, AttemptOutcome(error=error))
    assert first.retry
    lifecycle.queue.request_cancel(job_id, 1)  # now a fresh decision would differ: cancelled
    again = lifecycle.finish(job, AttemptOutcome(error=error))
    assert again.retry  # the stored outcome (a retry) stands, and its retry is noted
    assert lifecycle.queue.connection.llen(SETTLED_KEY + job_id) == 1
    assert lifecycle.store.due_retries(utcnow() + timedelta(seconds=60))[0]["job_id"] == job_id


def test_a_report_cannot_pass_for_a_timeout_a_lost_worker_or_a_cancel():
    from sless_daemon.executor import _known_error

    for kind in ("timeout", "worker_lost", "cancelled", "output_limit", "crashed"):
        assert _known_error({"type": kind, "message": "forged"})["type"] == "crashed"
    assert _known_error({"type": "exception", "message": "ValueError"})["type"] == "exception"


def test_a_message_taken_by_a_worker_that_died_before_claiming_is_sent_again(lifecycle):
    """The cheap periodic check (not the full scan) finds a message taken and never claimed,
    sends it again once, and forgets messages whose attempt was claimed."""
    from sless_daemon.consumer import Consumer
    from sless_daemon.recovery import Recovery

    queue = lifecycle.queue
    died, lived = lifecycle.accept(SPEC), lifecycle.accept(SPEC)
    taker = Consumer(queue, "taker", lambda payload, queued: None)
    assert taker.next_message()[0] == message_id(died, 0)  # taken, then the worker died
    assert taker.next_message()[0] == message_id(lived, 0)
    assert lifecycle.start(message(lifecycle, lived)) is not None  # this one was claimed
    assert queue.taken_before(float("inf")) == [message_id(died, 0), message_id(lived, 0)]
    sweeper = other_worker(lifecycle, "sweeper")
    sweeper.settings = dataclasses.replace(lifecycle.settings, lease_s=0.0)
    recovery = Recovery(sweeper)
    recovery.redis_forgot()  # as after its first sweep: it knows Redis kept its data
    recovery.next_full_scan = float("inf")  # only the cheap check may run
    assert recovery.sweep()["orphans"] == 1
    assert queue.depth() == 1 and queue.taken_before(float("inf")) == []
    assert Consumer(queue, "next", lambda payload, queued: None).next_message()[0] == message_id(died, 0)
    sweeper.settings = lifecycle.settings  # a lease of grace (10 s) for a message taken just now
    recovery.next_orphan_scan = 0.0
    assert recovery.sweep()["orphans"] == 0 and queue.depth() == 0


def test_a_handled_message_leaves_the_taken_set(lifecycle):
    from sless_daemon.consumer import Consumer

    lifecycle.accept(SPEC)
    handled = []
    consumer = Consumer(lifecycle.queue, "w", lambda payload, queued: handled.append(payload) or True)
    consumer.take_one()
    assert len(handled) == 1 and len(lifecycle.queue.taken_before(float("inf"))) == 1
    consumer.take_one()  # the next take (the queue is empty: it waits a second) marks the last finished
    assert lifecycle.queue.taken_before(float("inf")) == []


def test_a_taken_message_comes_with_how_many_messages_wait_behind_it(lifecycle):
    """What lets a draining worker write an outcome after starting the next job (worker.Recorder)."""
    from sless_daemon.consumer import Consumer

    for _ in range(3):
        lifecycle.accept(SPEC)
    queued = []
    consumer = Consumer(lifecycle.queue, "w", lambda payload, behind: queued.append(behind) or True)
    for _ in range(3):
        consumer.take_one()
    assert queued == [2, 1, 0]


def test_a_message_whose_payload_is_gone_is_taken_without_one(lifecycle):
    from sless_daemon.consumer import Consumer

    gone = lifecycle.accept(SPEC)
    lifecycle.accept(SPEC)
    lifecycle.queue.connection.delete(f"rq:job:{message_id(gone, 0)}")
    taken = Consumer(lifecycle.queue, "w", lambda payload, queued: True).next_message()
    assert taken == (message_id(gone, 0), None, 1)


def test_a_message_whose_record_is_written_later_stays_taken_until_then(lifecycle):
    """A handler that answers False (an attempt whose claim goes in with its settle) leaves
    the message taken, for the sweep, until the settle's announcement marks it finished."""
    from sless_daemon.consumer import Consumer

    job_id = lifecycle.accept(SPEC)
    consumer = Consumer(lifecycle.queue, "w", lambda payload, queued: False)
    consumer.take_one()
    consumer.take_one()  # the next take marks nothing
    assert lifecycle.queue.taken_before(float("inf")) == [message_id(job_id, 0)]
    job = lifecycle.attempt_of(message(lifecycle, job_id))
    lifecycle.finish_many([(job, AttemptOutcome(result=1, duration_ms=1.0), None)], claims=["r"])
    assert lifecycle.queue.taken_before(float("inf")) == []
    assert lifecycle.store.taken_by(job_id, 1, "claim") == lifecycle.owner
    assert lifecycle.store.get(job_id)["state"] == "completed"


def stuck_sweep(lifecycle: Lifecycle):
    """A sweeper that runs only the cheap stuck-message check, and finds every taken message stuck."""
    from sless_daemon.recovery import Recovery

    sweeper = other_worker(lifecycle, "sweeper")
    sweeper.settings = dataclasses.replace(lifecycle.settings, lease_s=0.0)
    recovery = Recovery(sweeper)
    recovery.redis_forgot()
    recovery.next_full_scan = float("inf")
    return recovery


def test_a_claim_that_went_in_without_its_settle_is_settled_lost_once_its_worker_is_gone(lifecycle):
    """A worker wrote an attempt's claim (with its run: claimed with its settle) but never its
    settle, and held no lease: the job reads waiting, and every message for the attempt
    would find it taken. While the worker lives, its recorder is still writing: left alone.
    Once it is gone, the sweep that finds the message taken settles the attempt as lost."""
    from sless_daemon.consumer import Consumer
    from sless_daemon.store import step_event

    job_id = lifecycle.accept(SPEC)
    worker = Consumer(lifecycle.queue, f"w-{uuid.uuid4().hex[:6]}", lambda payload, queued: False)
    worker.worker.register_birth()
    worker.take_one()
    lifecycle.store.events.insert_one(step_event(job_id, 1, "claim", worker.worker.name, run="r"))  # alone
    assert stuck_sweep(lifecycle).sweep()["orphans"] == 0
    assert lifecycle.store.get(job_id)["attempts"] == 0  # not settled, not sent again: its worker lives
    assert lifecycle.queue.taken_before(float("inf")) == [message_id(job_id, 0)]  # watched still
    worker.worker.register_death()
    assert stuck_sweep(lifecycle).sweep()["orphans"] == 0  # nothing sent again...
    doc = lifecycle.store.get(job_id)
    assert doc["attempts"] == 1 and doc["attempt_errors"][0]["type"] == "worker_lost"  # ...it was settled
    assert doc["state"] == "submitted" and doc["retry_at"] is not None
    assert lifecycle.store.due_retries(utcnow() + timedelta(hours=1))[0]["job_id"] == job_id


def test_a_withdrawal_that_stopped_halfway_is_finished_by_the_sweep(lifecycle):
    """The enqueue failed, the first attempt was fenced for nobody, and MongoDB went away
    before the record was removed: the sweep removes it instead of running the job."""
    from sless_daemon.consumer import Consumer
    from sless_daemon.store import WITHDRAWN

    job_id = lifecycle.accept(SPEC)
    Consumer(lifecycle.queue, "w", lambda payload, queued: False).take_one()
    lifecycle.store.fence(job_id, 1, WITHDRAWN)
    stuck_sweep(lifecycle).sweep()
    assert lifecycle.store.get(job_id) is None and lifecycle.queue.depth() == 0


def test_a_stuck_message_is_forgotten_by_one_sweeper(lifecycle):
    """Two sweepers list the same stuck message: one takes it over; and a message a worker
    took again since the listing is not forgotten."""
    from sless_daemon.consumer import Consumer

    job_id = lifecycle.accept(SPEC)
    Consumer(lifecycle.queue, "w", lambda payload, queued: False).take_one()
    queue, taken = lifecycle.queue, message_id(job_id, 0)
    assert not queue.forget_stuck(taken, time.time() - 60)  # taken later than that
    assert queue.forget_stuck(taken, time.time()) and not queue.forget_stuck(taken, time.time())
    assert 0 < queue.connection.ttl(f"rq:job:{taken}") <= 600


def test_a_retry_settled_with_its_claim_and_never_noted_is_noted_by_the_sweep(lifecycle):
    """A worker wrote an attempt's claim and settle (a retry) and died before noting the
    retry: there is no lease to recover it by, but its message is still taken."""
    from sless_daemon.consumer import Consumer
    from sless_daemon.store import settle_event, step_event

    job_id = lifecycle.accept(SPEC)
    Consumer(lifecycle.queue, "dead", lambda payload, queued: False).take_one()
    retry_at = utcnow()
    settle = settle_event(job_id, 1, {"state": "submitted", "retry_at": retry_at}, {"type": "exception"}, "dead")
    lifecycle.store.settle_many([settle], "dead", [step_event(job_id, 1, "claim", "dead")])
    assert lifecycle.store.due_retries(utcnow()) == []
    recovery = stuck_sweep(lifecycle)
    recovery.sweep()
    assert [r["job_id"] for r in lifecycle.store.due_retries(utcnow())] == [job_id]
    recovery.sweep()  # the retry is sent: attempt 2's message waits
    assert message(lifecycle, job_id, 1)["attempt"] == 2


def test_a_retry_claimed_with_its_settle_keeps_its_message_taken_until_noted(lifecycle, monkeypatch):
    """The message of an attempt claimed with its settle is what the sweep recovers it by: for
    a retry it is marked finished only once the retry is noted (here noting fails)."""
    from sless_daemon.consumer import Consumer
    from sless_daemon.errors import DependencyDown

    job_id = lifecycle.accept(SPEC)
    Consumer(lifecycle.queue, "w", lambda payload, queued: False).take_one()
    job = lifecycle.attempt_of(message(lifecycle, job_id))

    def refused(*args):
        raise DependencyDown("MongoDB", "gone")

    monkeypatch.setattr(lifecycle.store, "schedule_retry", refused)
    with pytest.raises(DependencyDown):
        lifecycle.finish_many([(job, AttemptOutcome(error=failed(ErrorType.EXCEPTION, "x")), None)], claims=["r"])
    assert lifecycle.store.get(job_id)["retry_at"] is not None  # settled as a retry...
    assert lifecycle.queue.taken_before(float("inf")) == [message_id(job_id, 0)]  # ...its message still taken


def test_a_claim_held_back_gets_a_whole_lease_from_when_it_is_written(lifecycle):
    job_id = lifecycle.accept(SPEC)
    job = {**lifecycle.attempt_of(message(lifecycle, job_id)), "started_at": utcnow() - timedelta(seconds=9)}
    assert lifecycle.claim(job)
    [lease] = lifecycle.store.leases_of(lifecycle.owner)
    assert lease["until"] > utcnow() + timedelta(seconds=lifecycle.settings.lease_s - 1)


def test_busy_workers_are_those_handling_a_message(lifecycle):
    """The autoscaler's count of busy workers: a worker handling a message, whether or not
    its attempt holds a lease; none once the message is marked handled."""
    from sless_daemon.consumer import Consumer

    lifecycle.accept(SPEC)
    lifecycle.accept(SPEC)
    assert lifecycle.queue.busy_workers() == set()
    done = Consumer(lifecycle.queue, "done", lambda payload, queued: True)
    held = Consumer(lifecycle.queue, "held", lambda payload, queued: False)
    done.take_one()
    held.take_one()
    assert lifecycle.queue.busy_workers() == {"done", "held"}
    done.take_one()  # the queue is empty: this take only marks the last message finished
    assert lifecycle.queue.busy_workers() == {"held"}


def test_a_parked_message_is_sent_again_once_and_then_left_alone(lifecycle):
    """A worker that died between its blocking pop and TAKE leaves the id in RQ's intermediate
    list: the cheap check sends it again, and clears the list so it is not looked at again."""
    from sless_daemon.recovery import Recovery

    queue = lifecycle.queue
    job_id = lifecycle.accept(SPEC)
    queue.connection.lmove(queue.rq_queue.key, queue.intermediate_key, "LEFT", "RIGHT")  # popped, never taken over
    assert queue.parked() == [message_id(job_id, 0)]
    recovery = Recovery(other_worker(lifecycle, "sweeper"))
    recovery.redis_forgot()
    assert recovery.requeue_stuck_messages() == 1
    assert queue.depth() == 1 and queue.parked() == []
    assert recovery.requeue_stuck_messages() == 0


@pytest.fixture
def runner(lifecycle):
    """A worker's attempt runner on `lifecycle`, in a real sandbox; its deferred writes wait
    for a word (never for DEFER_MAX_S) within a test."""
    from sless_daemon.executor import Executor
    from sless_daemon.sandbox import build_sandbox
    from sless_daemon.worker import AttemptRunner

    sandbox = build_sandbox("", lifecycle.settings.sandbox_uid_base + 92, slot=0)
    attempts = AttemptRunner(lifecycle, Executor(lifecycle.settings, sandbox, "runner-test"), "runner-test")
    attempts.recorder.DEFER_MAX_S = 3600
    yield attempts
    attempts.recorder.drain()
    attempts.executor.close()


def completed(lifecycle: Lifecycle, *job_ids: str) -> bool:
    return all(lifecycle.store.get(job_id)["state"] == JobState.COMPLETED.value for job_id in job_ids)


def test_an_outcome_with_messages_behind_it_is_written_once_the_next_attempt_has_its_request(lifecycle, runner):
    first, second = lifecycle.accept(SPEC), lifecycle.accept(SPEC)
    runner.run(message(lifecycle, first), 1)
    time.sleep(0.3)
    assert not completed(lifecycle, first)  # deferred while the next job starts
    runner.run(message(lifecycle, second), 0)  # its request lets the first through; nothing waits behind it
    wait_until(lambda: completed(lifecycle, first, second), 10, "both outcomes written")


def test_an_outcome_with_nothing_behind_it_is_not_deferred(lifecycle, runner):
    job_id = lifecycle.accept(SPEC)
    runner.run(message(lifecycle, job_id), 0)
    wait_until(lambda: completed(lifecycle, job_id), 10, "the outcome written")


def test_a_deferred_outcome_is_written_when_the_queue_is_found_empty(lifecycle, runner):
    job_id = lifecycle.accept(SPEC)
    runner.run(message(lifecycle, job_id), 1)  # another worker takes the message behind it
    runner.idle()
    wait_until(lambda: completed(lifecycle, job_id), 10, "the outcome written")


def test_a_deferred_outcome_is_written_when_the_next_message_cannot_be_read(lifecycle, runner):
    first, second = lifecycle.accept(SPEC), lifecycle.accept(SPEC)
    runner.run(message(lifecycle, first), 1)
    runner.run({**message(lifecycle, second), "limits": "unreadable"}, 0)  # fails, with no request sent
    wait_until(lambda: completed(lifecycle, first), 10, "the first outcome written")
    assert lifecycle.store.get(second)["state"] != JobState.COMPLETED.value
