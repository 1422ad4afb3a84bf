"""Every state change of a job, in one place: accept, start, finish, retry, lose.

The daemon accepts jobs, workers start and finish attempts, and the worker pool
recovers the attempts of lost workers; all of them go through `Lifecycle`, so the
rules (when to retry, how long to wait, what is terminal) live here only.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import BadRequest, DependencyDown
from .outcome import AttemptOutcome, failed
from .queue import JobQueue
from .settings import Settings
from .spec import JobSpec
from .states import ErrorType, JobState
from .store import OutcomeStore

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


def retry_delay_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped; `attempt` counts from 1."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


@dataclass(frozen=True)
class Decision:
    """What happens after a failed attempt: retry after `delay_s`, or give up."""

    retry: bool
    delay_s: float = 0.0


def decide_after_failure(attempt: int, max_attempts: int, error_type: ErrorType, settings: Settings) -> Decision:
    """Retry a retryable failure while attempts remain; syntax errors and the like never."""
    if error_type.retryable and attempt < max_attempts:
        return Decision(True, retry_delay_s(attempt, settings.retry_backoff_s, settings.max_retry_backoff_s))
    return Decision(False)


class Lifecycle:
    """Moves jobs between states in MongoDB and hands them to the queue."""

    def __init__(self, settings: Settings, store: OutcomeStore, queue: JobQueue, owner: str):
        """`owner` names this process (a worker's or pool's name) in the guards it takes."""
        self.settings = settings
        self.store = store
        self.queue = queue
        self.owner = owner

    def accept(self, spec: JobSpec) -> str:
        """Record then enqueue a new job; on any failure nothing is left behind.

        Raises DependencyDown naming MongoDB or Redis. The record goes first so a
        worker never dequeues an id MongoDB does not know.
        """
        job_id = new_job_id()
        self.store.insert(job_id, spec, utcnow())
        try:
            self.queue.enqueue(job_id, spec.timeout_s, 0)
        except Exception:
            self._forget(job_id)
            raise
        return job_id

    def _forget(self, job_id: str) -> None:
        try:
            self.store.delete(job_id)
        except DependencyDown:
            log.error("job %s: could not remove the record of a job whose enqueue failed", job_id)

    def start(self, job_id: str) -> dict | None:
        """Claim the job's next attempt for this worker; None when it is not waiting."""
        return self.store.claim(job_id, self.owner, utcnow(), self.settings.lease_s)

    def renew(self, job: dict) -> None:
        """Extend the running attempt's lease (the worker's heartbeat)."""
        until = utcnow() + timedelta(seconds=self.settings.lease_s)
        self.store.renew_lease(job["_id"], job["attempts"], self.owner, until)

    def finish(self, job: dict, outcome: AttemptOutcome) -> Decision:
        """Record an attempt's outcome: completed, retry scheduled, or failed for good."""
        attempt = job["attempts"]
        fields = {
            "stdout": outcome.stdout, "stderr": outcome.stderr, "duration_ms": outcome.duration_ms,
            "finished_at": utcnow(),
        }
        if outcome.ok:
            self._settle(job, attempt, {**fields, "state": JobState.COMPLETED.value,
                                        "result_json": json.dumps(outcome.result), "error": None})
            return Decision(False)
        return self.fail(job, attempt, outcome.error, fields)

    def fail(self, job: dict, attempt: int, error: dict, fields: dict) -> Decision:
        """Retry the job after a failed attempt, or mark it failed when that was the last."""
        decision = decide_after_failure(attempt, job["retries"] + 1, ErrorType(error["type"]), self.settings)
        if decision.retry:
            retry_at = utcnow() + timedelta(seconds=decision.delay_s)
            changes = {**fields, "state": JobState.SUBMITTED.value, "error": error, "worker": None,
                       "retry_at": retry_at, "finished_at": None}
        else:
            changes = {**fields, "state": JobState.FAILED.value, "error": error}
        if self._settle(job, attempt, changes, {**error, "at": utcnow()}) and decision.retry:
            self.store.schedule_retry(job["_id"], attempt, job["timeout_s"], changes["retry_at"])
        return decision

    def enqueue_due_retries(self, limit: int = 1000) -> int:
        """Enqueue the jobs whose retry time has come; returns how many.

        Retries wait in MongoDB (state submitted, `retry_at` set), not in Redis, so a
        Redis restart cannot lose them and no RQ scheduler process is needed. Safe
        to run from several places at once: each job is taken atomically.
        """
        count = 0
        for retry in self.store.due_retries(utcnow(), limit):
            job_id, attempts = retry["job_id"], retry["attempts"]
            if not self.store.take_retry(job_id, attempts, self.owner):
                continue
            try:
                self.queue.enqueue(job_id, retry["timeout_s"], attempts)
            except Exception:
                self.store.release_retry(job_id, attempts)
                raise
            self.store.forget_retry(job_id, attempts)
            count += 1
        return count

    def _settle(self, job: dict, attempt: int, changes: dict, error: dict | None = None) -> bool:
        if not self.store.settle(job["_id"], attempt, changes, error, self.owner):
            log.warning("job %s: attempt %d was settled elsewhere meanwhile; this outcome is discarded",
                        job["_id"], attempt)
            return False
        self.store.drop_lease(job["_id"], attempt)
        return True

    def reopen(self, job_id: str) -> dict:
        """Run a failed job again as a new attempt (dead letters); earlier errors are kept.

        Raises BadRequest: 404 for an unknown id, 409 when the job has not failed.
        """
        job = self.store.get(job_id)
        if job is None:
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        if job["state"] != JobState.FAILED.value:
            raise BadRequest(f"Job {job_id} is {job['state']}; only failed jobs can be retried.", 409)
        if not self.store.reopen(job_id, job["attempts"], self.owner):
            raise BadRequest(f"Job {job_id} is already being retried.", 409)
        self.queue.enqueue(job_id, job["timeout_s"], job["attempts"])
        return self.store.get(job_id)

    def lose(self, job: dict, why: str) -> Decision:
        """Recover the attempt of a worker that is gone: retry it or fail it as worker_lost."""
        error = failed(ErrorType.WORKER_LOST, why)
        return self.fail(job, job["attempts"], error, {"finished_at": utcnow()})
