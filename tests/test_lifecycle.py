"""State changes against the real MongoDB-wire server and Redis, without processes.

These pin down the rules every process relies on: a job is claimed once, a stale
attempt cannot write, a due retry is enqueued once however many sweepers run.
"""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest

from sless_daemon.executor import AttemptOutcome, failed
from sless_daemon.lifecycle import Lifecycle, utcnow
from sless_daemon.limits import resolve
from sless_daemon.queue import JobQueue, connect_redis
from sless_daemon.settings import Settings
from sless_daemon.spec import JobSpec
from sless_daemon.states import ErrorType, JobState
from sless_daemon.store import OutcomeStore, connect_mongo
from stack import MONGO_URL, REDIS_URL

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


def test_indexes_for_state_and_time(lifecycle):
    keys = [tuple(k for k, _ in index["key"]) for index in lifecycle.store.jobs.index_information().values()]
    assert ("state", "submitted_at") in keys and ("submitted_at",) in keys and ("worker",) in keys


def test_accept_records_then_enqueues(lifecycle):
    job_id = lifecycle.accept(SPEC)
    assert lifecycle.store.get(job_id)["state"] == "submitted"
    assert lifecycle.queue.depth() == 1


def test_a_redelivered_job_is_claimed_once(lifecycle):
    job_id = lifecycle.accept(SPEC)
    first = lifecycle.start(job_id)
    assert first["attempts"] == 1 and first["state"] == "running"
    assert other_worker(lifecycle).start(job_id) is None
    lifecycle.finish(first, AttemptOutcome(result=5, duration_ms=1.0))
    assert other_worker(lifecycle).start(job_id) is None
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "completed" and doc["attempts"] == 1 and doc["result_json"] == "5"


def test_a_stale_attempt_cannot_overwrite_a_newer_one(lifecycle):
    job_id = lifecycle.accept(SPEC)
    old_worker, sweeper, new_worker = (other_worker(lifecycle, name) for name in ("w1", "sweeper", "w2"))
    stale = old_worker.start(job_id)
    sweeper.lose(stale, "worker w1 vanished")  # given up on: back to waiting, retry due now
    assert sweeper.enqueue_due_retries() == 1
    fresh = new_worker.start(job_id)
    assert fresh["attempts"] == 2
    old_worker.finish(stale, AttemptOutcome(result="stale", duration_ms=1.0))  # the old worker comes back
    new_worker.finish(fresh, AttemptOutcome(result="fresh", duration_ms=1.0))
    doc = lifecycle.store.get(job_id)
    assert doc["result_json"] == '"fresh"' and doc["attempts"] == 2
    assert [e["type"] for e in doc["attempt_errors"]] == ["worker_lost"]


def test_failed_attempts_retry_then_fail_for_good(lifecycle):
    job_id = lifecycle.accept(SPEC)
    error = failed(ErrorType.EXCEPTION, "ValueError: x")
    decision = lifecycle.finish(lifecycle.start(job_id), AttemptOutcome(error=error, duration_ms=1.0))
    assert decision.retry
    assert lifecycle.store.get(job_id)["state"] == JobState.SUBMITTED
    lifecycle.enqueue_due_retries()
    decision = lifecycle.finish(lifecycle.start(job_id), AttemptOutcome(error=error, duration_ms=1.0))
    assert not decision.retry
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "failed" and doc["attempts"] == 2 and len(doc["attempt_errors"]) == 2


def test_a_due_retry_is_enqueued_once_by_concurrent_sweepers(lifecycle):
    ids = []
    for _ in range(20):
        job_id = lifecycle.accept(SPEC)
        lifecycle.queue.rq_queue.empty()
        lifecycle.lose(lifecycle.start(job_id), "gone")
        ids.append(job_id)
    counts = []
    sweepers = [other_worker(lifecycle, f"sweeper{i}") for i in range(4)]
    threads = [threading.Thread(target=lambda s=s: counts.append(s.enqueue_due_retries())) for s in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 20 and lifecycle.queue.depth() == 20


def test_a_retry_waits_for_its_time(lifecycle):
    job_id = lifecycle.accept(SPEC)
    lifecycle.finish(lifecycle.start(job_id), AttemptOutcome(error=failed(ErrorType.TIMEOUT, "t")))
    later = utcnow() + timedelta(hours=1)
    lifecycle.store.jobs.update_one({"_id": job_id}, {"$set": {"retry_at": later}})
    lifecycle.store.retries.update_many({}, {"$set": {"at": later}})
    assert lifecycle.enqueue_due_retries() == 0
    assert lifecycle.start(job_id) is None  # a message that arrives early does not start it either


def test_settling_is_reentrant_for_its_owner(lifecycle):
    """A worker whose outcome write failed half-way can write it again."""
    job_id = lifecycle.accept(SPEC)
    job = lifecycle.start(job_id)
    assert lifecycle.store.settle(job_id, 1, {"state": "completed", "result_json": "1"}, None, "test")
    assert lifecycle.store.settle(job_id, 1, {"state": "completed", "result_json": "1"}, None, "test")
    assert not lifecycle.store.settle(job_id, 1, {"state": "failed"}, None, "someone-else")
    assert lifecycle.store.get(job_id)["state"] == "completed" and job["attempts"] == 1


def test_a_settle_cut_short_is_finished_by_the_recovery_sweep(lifecycle):
    """The worker won the settle guard and died before updating the job: the sweep completes it."""
    from sless_daemon.recovery import Recovery
    from sless_daemon.store import guard_key

    job_id = lifecycle.accept(SPEC)
    lifecycle.start(job_id)
    lifecycle.store.guards.insert_one({"_id": guard_key(job_id, 1, "settle"), "owner": "dead-worker",
                                       "changes": {"state": "completed", "result_json": "7"}, "error": None})
    lifecycle.store.leases.update_many({}, {"$set": {"until": utcnow() - timedelta(seconds=1)}})
    assert Recovery(other_worker(lifecycle, "sweeper")).sweep()["lost"] == 1
    doc = lifecycle.store.get(job_id)
    assert doc["state"] == "completed" and doc["result_json"] == "7" and doc["attempt_errors"] == []


def test_a_lost_message_is_enqueued_again(lifecycle):
    from sless_daemon.recovery import Recovery

    job_id = lifecycle.accept(SPEC)
    lifecycle.queue.connection.delete(f"rq:job:{job_id}-0")  # as if Redis restarted without persistence
    lifecycle.queue.rq_queue.empty()
    lifecycle.store.jobs.update_one({"_id": job_id}, {"$set": {"submitted_at": utcnow() - timedelta(minutes=1)}})
    assert Recovery(lifecycle).sweep()["orphans"] == 1
    assert lifecycle.queue.depth() == 1
    assert Recovery(lifecycle).sweep()["orphans"] == 0  # now queued: left alone


def other_worker(lifecycle: Lifecycle, name: str = "w2") -> Lifecycle:
    """The same store and queue, seen from another process."""
    return Lifecycle(lifecycle.settings, lifecycle.store, lifecycle.queue, owner=name)


def test_concurrent_workers_claim_each_attempt_once(lifecycle):
    ids = [lifecycle.accept(SPEC) for _ in range(30)]
    wins: list[str] = []
    workers = [other_worker(lifecycle, f"w{i}") for i in range(4)]

    def claim_all(worker: Lifecycle) -> None:
        wins.extend(job_id for job_id in ids if worker.start(job_id) is not None)

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(ids)
