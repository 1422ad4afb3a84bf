"""Every state change of a job, in one place: accept, start, finish, retry, lose.

The daemon accepts jobs, workers start and finish attempts, and the worker pool
recovers the attempts of lost workers; all of them go through `Lifecycle`, so the
rules (when to retry, how long to wait, what is terminal) live here only.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from .errors import BadRequest, DependencyDown
from .feed import Feed
from .outcome import AttemptOutcome, failed
from .queue import JobQueue, message_id
from .settings import Settings
from .spec import JobSpec
from .states import ErrorType, JobState
from .store import OutcomeStore, settle_event, step_event

log = logging.getLogger(__name__)


CANCELLED = "Cancelled on request."
CANCEL_FENCE = "(cancelled)"  # the owner of the claim that keeps a cancelled job's next attempt from any worker
CANCEL_TRIES = 5
CANCELLED_BEFORE_START = "Cancelled on request before the attempt started."


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
    recorded: bool = True  # False: this outcome was discarded (settled or claimed elsewhere first)


@dataclass(frozen=True)
class Settlement:
    """How one attempt ends, as about to be written: its changes, error entry and decision."""

    job: dict
    changes: dict
    error: dict | None
    decision: Decision
    claim: dict | None = None  # the attempt's claim event, when it goes in with the settle


def _decision_of(event: dict) -> Decision:
    """The decision a stored settle event records: a retry when it left the job waiting."""
    if event["state"] == JobState.SUBMITTED.value and event.get("retry_at"):
        return Decision(True, max(0.0, (event["retry_at"] - utcnow()).total_seconds()))
    return Decision(False)


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
        self.feed = Feed(queue.connection)
        self.owner = owner

    def accept(self, spec: JobSpec, stages: dict | None = None) -> str:
        """Record then enqueue a new job; returns its id (see `accept_many`)."""
        return self.accept_many([spec], stages)[0]["_id"]

    def accept_many(self, specs: list[JobSpec], stages: dict | None = None) -> list[dict]:
        """Record then enqueue new jobs, with one insert and one Redis round trip for all; if
        the enqueue fails, the records are withdrawn. Returns the recorded documents.

        Raises DependencyDown naming MongoDB or Redis. The records go first so a
        worker never runs a job MongoDB does not know. `stages` receives the seconds
        each step took ("insert", "enqueue").

        One window stays, as it did for single inserts: when MongoDB goes away during
        the insert (some records written, the answer lost) or before the withdrawal
        of a failed enqueue, the caller is told 503 while records may remain; the
        orphan scan then enqueues them, so such a job can still run (once).
        """
        stages = {} if stages is None else stages
        ids = [new_job_id() for _ in specs]
        started = time.perf_counter()
        jobs = self.store.insert_many(list(zip(ids, specs)), utcnow())
        inserted = time.perf_counter()
        try:
            self.queue.enqueue_many(jobs)
        except Exception:
            self._forget(ids)
            raise
        stages.update(insert=inserted - started, enqueue=time.perf_counter() - inserted)
        return jobs

    def _forget(self, job_ids: list[str]) -> None:
        """Withdraw jobs whose enqueue failed (`store.withdraw`: no stray message can run them)."""
        for done, job_id in enumerate(job_ids):
            try:
                self.store.withdraw(job_id)
            except DependencyDown:
                log.error("could not remove the records of %d jobs that were not accepted: %s",
                          len(job_ids) - done, ", ".join(job_ids[done:]))
                return

    def start(self, message: dict) -> dict | None:
        """Claim the attempt a queue message carries for this worker.

        Returns the job as the attempt sees it (`attempt_of`), or None when that attempt
        was taken before (a duplicate message).
        """
        job = self.attempt_of(message)
        return job if self.claim(job) else None

    @staticmethod
    def attempt_of(message: dict) -> dict:
        """The job as the attempt a queue message carries sees it: `_id`, `attempts` counting
        this attempt, code, limits, retries..., and `started_at` (now). Not yet claimed."""
        job = {k: v for k, v in message.items() if k not in ("job_id", "attempt", "enqueued_at")}
        return {**job, "_id": message["job_id"], "attempts": message["attempt"], "started_at": utcnow()}

    def claim(self, job: dict) -> bool:
        """Take the attempt for this worker; False if it was taken before (a duplicate
        message). The attempt number fences every later write of the attempt."""
        until = utcnow() + timedelta(seconds=self.settings.lease_s)  # from now: a held-back claim comes later
        return self.store.claim(job["_id"], job["attempts"], self.owner, job["started_at"], until)

    def renew(self, job: dict) -> None:
        """Extend the running attempt's lease (the worker's heartbeat)."""
        until = utcnow() + timedelta(seconds=self.settings.lease_s)
        self.store.renew_lease(job["_id"], job["attempts"], self.owner, until)

    def finish(self, job: dict, outcome: AttemptOutcome, timings: dict | None = None) -> Decision:
        """Record an attempt's outcome: completed, retry scheduled, or failed for good.

        `timings` (epoch seconds of the attempt's stages) are kept with the outcome.
        """
        return self.finish_many([(job, outcome, timings)])[0]

    def finish_many(self, finished: list[tuple[dict, AttemptOutcome, dict | None]], drop_leases: bool = True,
                    claims: list[str | None] | None = None) -> list[Decision]:
        """Record several attempts' outcomes at once (one insert for all: a worker's recorder
        writes whatever finished while it was writing the last batch). A worker drops the
        leases itself later, many at once (`drop_leases=False`, worker.Recorder). `claims`
        (parallel to `finished`) names the runs of attempts that ended before their claim
        was written: the claim, naming the run, goes in just before the settle (`store.settle_many`)."""
        settlements = []
        for (job, outcome, timings), run in zip(finished, claims or [None] * len(finished)):
            fields = {
                "stdout": outcome.stdout, "stderr": outcome.stderr, "duration_ms": outcome.duration_ms,
                "finished_at": utcnow(), "worker": self.owner, "started_at": job.get("started_at"),
                "timings": {**(timings or {}), **outcome.timings, "recorded_at": time.time()},
            }
            if outcome.ok:
                changes = {**fields, "state": JobState.COMPLETED.value, "result_json": json.dumps(outcome.result),
                           "error": None}
                settlement = Settlement(job, changes, None, Decision(False))
            else:
                settlement = self._failure(job, outcome.error, fields)
            if run:
                settlement = replace(settlement, claim=step_event(job["_id"], job["attempts"], "claim", self.owner,
                                                                  at=job["started_at"], run=run))
            settlements.append(settlement)
        return self._settle(settlements, drop_leases)

    def fail(self, job: dict, error: dict, fields: dict) -> Decision:
        """Retry the job after a failed attempt, or mark it failed when that was the last."""
        return self._settle([self._failure(job, error, fields)])[0]

    def _failure(self, job: dict, error: dict, fields: dict) -> Settlement:
        """A failed attempt's settlement: retry, failed, or cancelled (killed on request, or
        failed by itself while a cancel was pending: the retry would only be cancelled)."""
        kind = ErrorType(error["type"])
        decision = decide_after_failure(job["attempts"], job["retries"] + 1, kind, self.settings)
        if kind == ErrorType.CANCELLED or (decision.retry and self._cancel_requested(job["_id"], job["attempts"])):
            why = error if kind == ErrorType.CANCELLED else failed(ErrorType.CANCELLED, CANCELLED)
            changes = {**fields, "state": JobState.CANCELLED.value, "error": why}
            return Settlement(job, changes, {**error, "at": utcnow()}, Decision(False))
        if decision.retry:
            retry_at = utcnow() + timedelta(seconds=decision.delay_s)
            changes = {**fields, "state": JobState.SUBMITTED.value, "error": error, "worker": None,
                       "retry_at": retry_at, "finished_at": None}
        else:
            changes = {**fields, "state": JobState.FAILED.value, "error": error}
        return Settlement(job, changes, {**error, "at": utcnow()}, decision)

    def enqueue_due_retries(self, limit: int = 1000) -> int:
        """Enqueue the jobs whose retry time has come; returns how many.

        Retries wait in MongoDB (state submitted, `retry_at` set), not in Redis, so a
        Redis restart cannot lose them and no RQ scheduler process is needed. Safe
        to run from several places at once: each job is taken atomically.
        """
        count, now = 0, utcnow()
        abandoned_before = now - timedelta(seconds=self.settings.lease_s)
        for retry in self.store.due_retries(now, limit):
            job_id, attempts, reopened = retry["job_id"], retry["attempts"], retry.get("reopened", False)
            if self.store.take_retry(job_id, attempts, self.owner):
                try:
                    self._send_retry(self.store.get(job_id), attempts, reopened)
                except Exception:
                    self.store.release_retry(job_id, attempts)
                    raise
            elif (self._retry_taken_at(job_id, attempts) or retry["at"]) <= abandoned_before:
                self._take_over_retry(job_id, attempts, reopened)
            else:
                continue  # on its way from the sweeper that took it
            self.store.forget_retry(job_id, attempts)
            count += 1
        return count

    def _retry_taken_at(self, job_id: str, attempts: int) -> datetime | None:
        """When another sweeper took this retry (None: from before that was noted)."""
        held = self.store.step_taken(job_id, attempts, "enqueue")
        return held.get("at") if held else None

    def _send_retry(self, job: dict | None, attempts: int, reopened: bool = False) -> None:
        """Enqueue a due retry; cancel it instead when a cancel of the attempt that failed is
        pending, unless the job was reopened by hand after that attempt (Lifecycle.reopen)."""
        if job is not None and not reopened and self._cancel_requested(job["_id"], attempts):
            self.cancel_before_start(job)  # cancelled while its failed attempt was being settled
        elif job is not None:
            self.queue.enqueue(job, attempts)

    def _take_over_retry(self, job_id: str, attempts: int, reopened: bool = False) -> None:
        """Send a retry that another sweeper took a lease ago (or, if it did not note when, that
        has been due that long) and never sent: it died between taking it and enqueuing it (a
        live one sends it within milliseconds, or gives it back), and only a full orphan scan
        would find the job otherwise. Only if the job still waits for it and Redis has no
        message for it (a duplicate message would find the claim taken)."""
        job = self.store.get(job_id)
        if (job is None or job["state"] != JobState.SUBMITTED.value or job["attempts"] != attempts
                or not self.queue.missing([(job_id, attempts)], self.settings.lease_s)):
            return  # it moved on, or was sent before its sweeper died
        log.warning("job %s: the sweeper that took its retry never sent it; sending it now", job_id,
                    extra={"job_id": job_id})
        self._send_retry(job, attempts, reopened)

    def _settle(self, settlements: list[Settlement], drop_leases: bool = True) -> list[Decision]:
        """Write the settle events; then announce those written now, schedule the retries
        of those that stand, drop the leases.

        An attempt somebody else settled first (a sweeper that gave up on this worker)
        keeps that outcome: this one is discarded, logged, and its decision is no retry;
        so is one whose claim, written with its settle, was taken before (a duplicate).
        An attempt this owner settled before (its earlier try failed after the insert)
        keeps that stored outcome, which was announced then: its retry, if it is one, is
        scheduled again (idempotent) and nothing is announced twice.

        An attempt whose claim came with its settle has no lease, so its message, still
        taken, is what the sweep recovers it by until it is marked finished here: with the
        announcement, or after its retry is noted (else a worker dying in between would
        leave that retry to the hourly full scan).
        """
        events = [settle_event(s.job["_id"], s.job["attempts"], s.changes, s.error, self.owner) for s in settlements]
        standing = self.store.settle_many(events, self.owner, [s.claim for s in settlements])
        decisions = [self._decision(s, event) for s, event in zip(settlements, standing)]
        handled = [(message_id(s.job["_id"], s.job["attempts"] - 1), d.retry)
                   for s, d in zip(settlements, decisions) if s.claim]
        try:  # first: whoever waits for these jobs needs nothing below
            self.queue.announce_settled([event for event in standing if event and not event.get("again")],
                                        [message for message, retry in handled if not retry])
        except DependencyDown as e:  # the record is written; waiters fall back to reading it
            log.warning("could not announce recorded attempts (%s)", e)
        for settlement, event, decision in zip(settlements, standing, decisions):
            if decision.retry:
                self.store.schedule_retry(settlement.job["_id"], settlement.job["attempts"], event["retry_at"])
        retried = [message for message, retry in handled if retry]
        if retried:
            try:
                self.queue.mark_finished(retried)
            except DependencyDown as e:  # the sweep finds them noted, and forgets them
                log.warning("could not mark %d handled messages finished (%s)", len(retried), e)
        if drop_leases:
            self.store.drop_leases([(s.job["_id"], s.job["attempts"]) for s in settlements if not s.claim])
        return decisions

    def _decision(self, settlement: Settlement, event: dict | None | bool) -> Decision:
        """What follows one settle, as `settle_many` answered it (a discarded outcome is logged)."""
        job = settlement.job
        if event is False:
            log.info("job %s: attempt %d was taken before (a duplicate message); its run here is discarded",
                     job["_id"], job["attempts"])
        elif event is None:
            log.warning("job %s: attempt %d was settled elsewhere meanwhile; this outcome is discarded",
                        job["_id"], job["attempts"])
        if not event:
            return Decision(False, recorded=False)
        return _decision_of(event) if event.get("again") else settlement.decision

    def reopen(self, job_id: str) -> dict:
        """Run a failed job again as a new attempt (dead letters); earlier errors are kept.

        Raises BadRequest: 404 for an unknown id, 409 when the job has not failed. Once
        reopened, the job is accepted: if Redis refuses its message, it is noted as a retry
        due now, which the recovery sweep sends (enqueue_due_retries).
        """
        job = self.store.get(job_id)
        if job is None:
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        if job["state"] != JobState.FAILED.value:
            raise BadRequest(f"Job {job_id} is {job['state']}; only failed jobs can be retried.", 409)
        if not self.store.reopen(job_id, job["attempts"], self.owner, utcnow()):
            raise BadRequest(f"Job {job_id} is already being retried.", 409)
        job = self.store.get(job_id)
        try:
            self.queue.enqueue(job, job["attempts"])
        except DependencyDown as e:  # reopened for good: the due-retries sweep sends it once Redis is back
            log.warning("job %s: reopened, but not queued (%s); the sweep will send it", job_id, e)
            self.store.schedule_retry(job_id, job["attempts"], utcnow(), reopened=True)
        return job

    def cancel(self, job_id: str) -> tuple[dict, bool]:
        """Cancel a job: the job as of now, and whether it is cancelled already.

        A job waiting for a worker (queued, or for its retry) is cancelled at once: its
        next attempt is claimed for nobody (CANCEL_FENCE), so no worker can run it, and
        settled as cancelled. A running attempt is asked to stop (durably in MongoDB, and
        in Redis for its worker, which kills its sandbox within a quarter second); the
        answer comes before it has. Raises BadRequest: 404 unknown id, 409 already ended
        (or changing state faster than it can be cancelled, which a retry of the request
        settles).
        """
        for _ in range(CANCEL_TRIES):
            job = self.store.get(job_id)
            if job is None:
                raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
            if JobState(job["state"]).is_terminal:
                raise BadRequest(f"Job {job_id} already ended ({job['state']}); there is nothing to cancel.", 409)
            if job["state"] == JobState.SUBMITTED.value and self.cancel_before_start(job):
                return self.store.get(job_id), True
            if job["state"] == JobState.RUNNING.value:
                self.store.request_cancel(job_id, job["attempts"], self.owner, utcnow())
                self.queue.request_cancel(job_id, job["attempts"])
                return job, False
            # a worker claimed the next attempt just now, or the running one just ended: look again
        raise BadRequest(f"Job {job_id} changed state while it was being cancelled; ask again.", 409)

    def cancel_before_start(self, job: dict) -> bool:
        """Fence a waiting job's next attempt and settle it cancelled; False if a worker
        claimed that attempt first. Finishes a cancel that stopped between the two (the
        fence is there, the settle is not): the sweep calls this for such jobs too."""
        job_id, attempt = job["_id"], job["attempts"] + 1
        if (not self.store.fence(job_id, attempt, CANCEL_FENCE)
                and self.store.taken_by(job_id, attempt, "claim") != CANCEL_FENCE):
            return False
        changes = {"state": JobState.CANCELLED.value, "finished_at": utcnow(), "worker": None, "retry_at": None,
                   "error": failed(ErrorType.CANCELLED, CANCELLED_BEFORE_START)}
        self._settle([Settlement({**job, "attempts": attempt}, changes, None, Decision(False))])
        self.store.forget_retry(job_id, job["attempts"])
        return True

    def _cancel_requested(self, job_id: str, attempt: int) -> bool:
        """Whether a cancel of this attempt is pending: Redis's key, or MongoDB's durable
        event when Redis is away (that read scans FerretDB's events, so not every time)."""
        try:
            return self.queue.cancel_requested(job_id, attempt)
        except DependencyDown:
            return self.store.cancel_requested(job_id, attempt)

    def lose(self, lease: dict, why: str) -> tuple[dict, Decision] | None:
        """Recover the attempt a gone worker held (its lease; or, from the sweep, the claim it
        wrote without its settle): retry it or fail it as worker_lost.

        Returns the job and what was decided, or None when the job had already ended
        (the worker died after recording, before dropping its lease).
        """
        job = self.store.get(lease["job_id"])
        if job is None or job["attempts"] > lease["attempt"] or JobState(job["state"]).is_terminal:
            self.store.drop_leases([(lease["job_id"], lease["attempt"])])
            return None
        if job["attempts"] == lease["attempt"] and job["state"] == JobState.SUBMITTED.value and job["retry_at"]:
            # settled as a retry, and its worker died before noting the retry: note it now
            self.store.schedule_retry(job["_id"], lease["attempt"], job["retry_at"])
            self.store.drop_leases([(lease["job_id"], lease["attempt"])])
            return None
        job = {**job, "attempts": lease["attempt"]}  # the attempt's own event fences the settle
        error = failed(ErrorType.WORKER_LOST, why)
        decision = self.fail(job, error, {"finished_at": utcnow(), "worker": lease["worker"],
                                          "started_at": lease.get("started_at")})
        return job, decision
