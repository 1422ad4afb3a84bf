"""The recovery sweep: whatever dies along the way, every accepted job reaches a terminal state.

MongoDB holds the durable record; Redis is only the transport. The sweep compares
the two and mends the difference:

- a running attempt whose lease nobody renewed (its worker, pool or host is gone)
  is settled as `worker_lost`: retried, or failed when its retries are spent;
- a retry whose time has come is enqueued;
- a job waiting for a worker whose message Redis no longer has (Redis restarted
  without persistence, an enqueue lost, a retry sweeper that died), or whose message a
  worker took and never handled, is enqueued again; if that worker got halfway (a
  claim written without its settle, a retry settled and not noted), that is mended.

Worker pools run it every `sweep_interval_s`, and the daemon at start and then
periodically. Several sweepers, on several hosts, may run at once: settling an
attempt and enqueuing a retry are guarded in MongoDB, and a duplicate message is
skipped when a worker claims it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from .errors import DependencyDown
from .lifecycle import CANCEL_FENCE, Lifecycle, utcnow
from .queue import attempt_of, message_id
from .states import JobState
from .store import WITHDRAWN

log = logging.getLogger("sless.recovery")
MARKER_KEY = "sless:recovery:marker"
ORPHAN_BATCH = 2000  # waiting jobs looked up in Redis per round trip (one pipeline)
CLOCK_MARGIN_S = 1.0  # clocks of daemons on several hosts differ a little


class Recovery:
    """One sweeper; `sweep` is safe to call from several processes and hosts at once."""

    def __init__(self, lifecycle: Lifecycle, full_scan_at_start: bool = True):
        self.lifecycle = lifecycle
        self.store = lifecycle.store
        self.outage: str | None = None
        self.next_orphan_scan = 0.0
        settings = lifecycle.settings
        self.next_full_scan = 0.0 if full_scan_at_start else time.monotonic() + settings.orphan_full_scan_interval_s
        # A full scan leaves the jobs that became due within the grace before it: they may be on
        # their way to Redis still. A grace later, those (and only those) are looked at again.
        self.second_look: tuple[float, list[dict]] | None = None  # when; the jobs as the scan saw them
        self.marker_seen: bytes | None = None
        self.run_seen: str | None = None

    def sweep(self) -> dict[str, int]:
        """Run the repairs once; returns how many jobs each one touched.

        Leases and retries live in small collections and are checked every time.
        Every `orphan_scan_interval_s` (5 s) the messages workers took and never handled, or
        left in RQ's intermediate list, are looked at (a set in Redis: cheap however
        many jobs are stored). The full orphan scan reads every job and event (2.7 s
        with 10,000 jobs on FerretDB), so it runs at start, as soon as Redis shows it
        lost its data or restarted (`redis_forgot`), and otherwise once per
        `orphan_full_scan_interval_s`. A job that became due within the grace before a scan
        may still be on its way to Redis, so the scan leaves it; a grace later those jobs,
        and only those, are looked at again (`second_look`): a daemon's start scan is too
        early for what its predecessor recorded last, and a scan as Redis forgot for what
        it was sent last. Reading every job again for them took FerretDB 0.24-0.25 s at 800
        jobs and 0.65-0.68 s at 2,000, in the middle of everyone's calls (BENCHMARKS.md, session 13).

        A worker pool skips the scan at start (`full_scan_at_start=False`) unless Redis lost
        its data, so starting workers does not read every job ever stored while they
        drain the queue (the 10,000-job drain's first half ran 20 % slower for it). While
        Redis keeps its data, an orphan is most often a job a daemon recorded and died
        before enqueuing: a daemon scans when it starts, and looks again a grace later. A
        retry a sweeper took and never sent goes out with the due retries
        (Lifecycle.enqueue_due_retries). Rarer ones (a daemon that died between recording
        and enqueuing while another daemon ran, a sweeper that died halfway through
        sending a stuck message again, an enqueue and its withdrawal both refused) wait
        for the hourly scan.
        """
        try:
            counts = {"lost": self.recover_lost_attempts(), "retries": self.lifecycle.enqueue_due_retries()}
            settings, now = self.lifecycle.settings, time.monotonic()
            if self.redis_forgot():
                self.next_full_scan = 0.0  # still due if this sweep fails
            if now >= self.next_full_scan:
                counts["orphans"], young = self.requeue_orphans()
                self.second_look = (now + settings.orphan_grace_s, young) if young else None
                self.next_full_scan = now + settings.orphan_full_scan_interval_s
                self.next_orphan_scan = now + settings.orphan_scan_interval_s
            elif self.second_look and now >= self.second_look[0]:
                counts["orphans"] = self._requeue_lost(self.second_look[1])
                self.second_look = None
            elif now >= self.next_orphan_scan:
                counts["orphans"] = self.requeue_stuck_messages()
                self.next_orphan_scan = now + (settings.orphan_grace_s if counts["orphans"]
                                               else settings.orphan_scan_interval_s)
        except DependencyDown as e:
            if self.outage != e.dependency:  # once per outage, not every second
                log.warning("recovery sweep paused until %s is back: %s", e.dependency, e)
            self.outage = e.dependency
            return {}
        if self.outage:
            log.info("recovery sweep running again (%s is back)", self.outage)
            self.outage = None
        return counts

    def redis_forgot(self) -> bool:
        """Whether Redis may have lost data since the last look.

        A marker key is kept in Redis; when it is gone, or another sweeper replaced it
        after finding it gone, Redis forgot what it held, messages included (a restart
        without persistence). When Redis restarted with its data (its run id changed),
        it may still have lost its last writes: `appendfsync everysec` keeps all but
        about the last second. Only a sweeper that was running across the restart can
        tell (one started since finds the marker in place); one started anywhere later
        scans at its start if it is a daemon's, and every sweeper within the hour.
        """
        queue = self.lifecycle.queue
        run = queue.server_run()  # first: a refusal must not spend the marker's news
        marker, missing = queue.marker(MARKER_KEY)
        restarted = run is not None and self.run_seen is not None and run != self.run_seen
        forgot = missing or (self.marker_seen is not None and (marker != self.marker_seen or restarted))
        self.marker_seen, self.run_seen = marker, run
        return forgot

    def recover_lost_attempts(self) -> int:
        """Settle attempts whose lease expired as lost."""
        count = 0
        for lease in self.store.expired_leases(utcnow()):
            lost = self.lifecycle.lose(lease, f"worker {lease['worker']} stopped renewing its lease")
            if lost:
                job, decision = lost
                log.warning("job %s: worker %s lost (lease expired); %s", job["_id"], lease["worker"],
                            "retry scheduled" if decision.retry else "failed: no retries left",
                            extra={"job_id": job["_id"], "worker": lease["worker"]})
                count += 1
        return count

    def requeue_orphans(self) -> tuple[int, list[dict]]:
        """Enqueue again the waiting jobs whose message Redis lost; returns how many, and the
        waiting jobs that became due too recently to tell (`sweep`'s second look). A job
        stamped up to CLOCK_MARGIN_S ahead of this host's clock (another host's) counts as
        young; a retry due later than that is the due-retries sweep's."""
        waiting = self.store.waiting()
        now = utcnow()  # after the read, which takes seconds with many jobs
        old, young = [], []
        for job in waiting:
            due_at = job["retry_at"] or job["submitted_at"]
            if due_at < now - self.grace:
                old.append(job)
            elif due_at <= now + timedelta(seconds=CLOCK_MARGIN_S):
                young.append(job)
        return self._requeue_lost(old), young

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.lifecycle.settings.orphan_grace_s)

    def _requeue_lost(self, waiting: list[dict]) -> int:
        """Send again those of the `waiting` jobs (as seen) that no worker will start from Redis,
        asking Redis about ORPHAN_BATCH of them per round trip."""
        count = 0
        for start in range(0, len(waiting), ORPHAN_BATCH):
            batch = waiting[start:start + ORPHAN_BATCH]
            pairs = [(job["_id"], job["attempts"]) for job in batch]
            for index in self.lifecycle.queue.missing(pairs, self.lifecycle.settings.lease_s):
                seen = batch[index]
                job = self.store.get(seen["_id"])  # now, and with its code and input for the message
                count += self.send_again(job, seen["attempts"], "was waiting but Redis had no message for it")
        return count

    def requeue_stuck_messages(self) -> int:
        """Send again the messages a worker took (or parked) and never handled, when their
        attempt is still waiting: the worker died between taking and claiming (or before
        writing the claim it held back with its settle), or could not claim (MongoDB away).
        Also mends what such a worker left half done: a retry it settled and did not note,
        a claim that went in without its settle (`send_again`). Looks only at those
        messages, not at every job."""
        queue, cutoff = self.lifecycle.queue, time.time() - self.lifecycle.settings.lease_s
        count = 0
        for message in queue.taken_before(cutoff) + queue.parked():
            if not queue.forget_stuck(message, cutoff):  # before a resend: a worker taking it again notes it anew
                continue  # another sweeper has it, or a worker took it again meanwhile
            named = attempt_of(message)
            job = self.store.get(named[0]) if named else None
            if job is not None:
                self.note_retry(job, named[1] + 1)
                count += self.send_again(job, named[1], "had its message taken by a worker that never claimed it")
        return count

    def send_again(self, job: dict | None, attempts: int, why: str) -> bool:
        """Enqueue the attempt after `attempts` again if the job still waits for it (as of `job`,
        read now) and nobody claimed it; a claimed one is mended instead (`mend_claimed`).
        True if sent."""
        if (job is None or job["state"] != JobState.SUBMITTED.value or job["attempts"] != attempts
                or (job["retry_at"] is not None and job["retry_at"] > utcnow())):
            return False  # it moved on since it was seen: a worker took the message meanwhile
        claim = self.store.step_taken(job["_id"], attempts + 1, "claim")
        if claim is not None:
            self.mend_claimed(job, attempts + 1, claim)
            return False
        try:
            self.lifecycle.queue.resend(job, attempts)
        except KeyError as e:  # one unreadable record must not stop the recovery of the others
            log.error("job %s cannot be sent again: its record has no %s", job["_id"], e)
            return False
        log.warning("job %s %s; enqueued again", job["_id"], why, extra={"job_id": job["_id"]})
        return True

    def note_retry(self, job: dict, attempt: int) -> None:
        """Note the retry of an attempt settled as one by a worker that died before noting it.
        With a lease the lease's recovery does this (Lifecycle.lose); an attempt claimed with
        its settle has none, and its message, not yet marked finished, is what is left."""
        if (job["attempts"] == attempt and job["state"] == JobState.SUBMITTED.value and job["retry_at"] is not None
                and self.store.taken_by(job["_id"], attempt, "enqueue") is None):
            self.store.schedule_retry(job["_id"], attempt, job["retry_at"])
            if self.store.taken_by(job["_id"], attempt, "enqueue") is not None:  # another sweeper sent it meanwhile
                self.store.forget_retry(job["_id"], attempt)

    def mend_claimed(self, job: dict, attempt: int, claim: dict) -> None:
        """A job that reads waiting although its next attempt is claimed: a cancel or a
        withdrawal that stopped halfway is finished; a claim written with its settle (it
        names its `run`) whose settle never went in (the worker died between the two, or
        the settle was refused), by a worker no longer alive, is settled as lost, since
        every message for that attempt would find its claim taken and the job wait for
        ever. A claim with a lease is the lease sweep's (the job read before it came in);
        a live worker's is on its way (its recorder retries): its message is watched again."""
        owner = claim.get("owner")
        if owner == CANCEL_FENCE:
            self.lifecycle.cancel_before_start(job)
        elif owner == WITHDRAWN:
            self.store.withdraw(job["_id"])
        elif claim.get("run") is not None:  # written with its settle, which is not in
            if self.lifecycle.queue.worker_alive(owner):  # looked at again at the next check
                self.lifecycle.queue.note_taken(message_id(job["_id"], attempt - 1),
                                                time.time() - self.lifecycle.settings.lease_s)
            else:
                self.settle_lost_claim(job, attempt, owner)

    def settle_lost_claim(self, job: dict, attempt: int, worker: str) -> None:
        """Settle as lost an attempt whose claim went in without its settle (`mend_claimed`)."""
        lost = self.lifecycle.lose({"job_id": job["_id"], "attempt": attempt, "worker": worker},
                                   f"worker {worker} claimed the attempt and never recorded its end")
        if lost:
            log.warning("job %s: attempt %d claimed by %s was never settled; %s", job["_id"], attempt, worker,
                        "retry scheduled" if lost[1].retry else "failed: no retries left",
                        extra={"job_id": job["_id"], "worker": worker})

    def run_in_background(self, interval_s: float, stop: threading.Event) -> threading.Thread:
        """Sweep now and then every `interval_s` until `stop` is set (the daemon's way)."""

        def loop() -> None:
            while True:
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - the sweeper must outlive any one bad sweep
                    log.exception("recovery sweep failed; trying again")
                if stop.wait(interval_s):
                    return

        thread = threading.Thread(target=loop, name="recovery", daemon=True)
        thread.start()
        return thread
