"""The durable record of every job in MongoDB: its submission and the events of its attempts.

- `jobs`: one document per job, inserted at submit and never changed (code, input,
  limits, retries, submitted_at).
- `events`: one document per step of an attempt, inserted once under a unique `_id`
  `<job>/<attempt>/<step>`: `claim` (a worker took it: a permanent fence against
  running it twice), `settle` (how it ended: completed, failed, or a retry at a given
  time, with result, error and output), `enqueue` (a sweeper enqueued its retry),
  `reopen` (a failed job retried by hand), `cancel` (a cancel asked for while it ran).
- `leases`: the attempts running now, one per attempt under a unique `_id`: inserting
  it is how a worker starts claiming the attempt; its heartbeat renews it; it is dropped
  once the attempt is settled. A quiet attempt that ends within the claim hold has none:
  its claim goes in with its settle (`settle_many`).
- `retries`: the retries waiting for their time.

A job's state is derived from its events (`derive`); `get` returns the job as of now.

Why this shape. Exactly one process must win each step: a unique `_id` insert
guarantees that, while FerretDB 1.24 (SQLite) applies conditional updates without
isolation (measured with 4 threads: 216 wins for 200 documents; unique inserts: 300
of 300). And FerretDB 1.24 updates and deletes by `_id` with a scan of the whole
collection (its SQL filters on `->'$._id'`, its index is on `->"_id"`): measured 1.6 ms
per update at 100 documents and 10 ms at 3,000, while inserts check the unique index
and stay flat. So nothing that grows with the number of jobs is ever updated or
deleted on a job's path: `jobs` and `events` only receive inserts, and only `leases`
and `retries`, which hold what is running or waiting now, are updated.

Inputs and results are stored as JSON text (`input_json`, `result_json`) so any JSON
value round-trips exactly: BSON cannot hold integers past 64 bits, and MongoDB
servers differ on keys with dots or dollars.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone

import pymongo
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError

from .errors import DependencyDown
from .spec import JobSpec
from .states import JobState

MONGO = "MongoDB"
DUPLICATE_KEY = 11000
SOCKET_TIMEOUT_MS = 4000  # well under a lease (10 s): a stalled renewal fails and the next one comes
# what the orphan scan reads of each event (the output and result stay on the server)
EVENT_SUMMARY = {"job_id": 1, "attempt": 1, "step": 1, "state": 1, "retry_at": 1, "retries": 1}
# what a job listing reads of each event: all but the output and the result
EVENT_WITHOUT_OUTPUT = {"changes.stdout": 0, "changes.stderr": 0, "changes.result_json": 0}
LIST_BATCH = 500
WITHDRAWN = "(withdrawn)"  # the owner of the claim that keeps a withdrawn job's first attempt from any worker


def guard_key(job_id: str, attempt: int, step: str) -> str:
    """The `_id` that only one process may insert: e.g. `<job>/2/settle`."""
    return f"{job_id}/{attempt}/{step}"


def mongo_call(method):
    """Wrap pymongo's connection errors as DependencyDown("MongoDB").

    Other pymongo errors (a refused operation, say) are bugs, not outages: they pass.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ConnectionFailure as e:
            raise DependencyDown(MONGO, str(e).split(", Timeout:")[0][:300]) from e

    return wrapper


def connect_mongo(url: str, timeout_s: float = 3.0) -> pymongo.MongoClient:
    """A client that fails within `timeout_s` instead of pymongo's 30 s default."""
    ms = int(timeout_s * 1000)
    return pymongo.MongoClient(
        url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=max(ms, SOCKET_TIMEOUT_MS),
        tz_aware=True, appname="sless",
    )


def derive(job: dict, events: list[dict], leases: list[dict]) -> dict:
    """The job as of its latest events and leases: state, attempts, result, errors, output, times.

    The attempt in play is the highest one anybody holds a lease on or settled.
    Neither: submitted. Leased, not settled: running. Settled: completed, failed, or
    submitted again with a retry time; a failed job that was reopened waits again.
    """
    if job.get("state") in (JobState.COMPLETED.value, JobState.FAILED.value):
        return job  # recorded whole by an earlier sless, which updated the job document in place
    now = {**job, "state": JobState.SUBMITTED.value, "attempts": 0, "result_json": None, "error": None,
           "attempt_errors": [], "stdout": "", "stderr": "", "started_at": None, "finished_at": None,
           "duration_ms": None, "worker": None, "retry_at": None, "timings": None}
    steps = {(e["attempt"], e["step"]): e for e in events}
    settled = sorted((e for e in events if e["step"] == "settle"), key=lambda e: e["attempt"])
    now["attempt_errors"] = [{"attempt": e["attempt"], **e["error"]} for e in settled if e.get("error")]
    for reopen in sorted((e for e in events if e["step"] == "reopen"), key=lambda e: e["attempt"]):
        now["retries"] = reopen["retries"]
    attempt = max([e["attempt"] for e in settled] + [lease["attempt"] for lease in leases], default=0)
    if attempt == 0:
        return now
    now["attempts"] = attempt
    settle = steps.get((attempt, "settle"))
    if settle is None:
        lease = next(lease for lease in leases if lease["attempt"] == attempt)
        now.update(state=JobState.RUNNING.value, started_at=lease.get("started_at"), worker=lease.get("worker"))
        return now
    now.update(settle.get("changes") or {})
    now["state"], now["retry_at"] = settle["state"], settle.get("retry_at")
    if settle["state"] == JobState.FAILED.value and (attempt, "reopen") in steps:
        now.update(state=JobState.SUBMITTED.value, finished_at=None, worker=None)
    return now


def step_event(job_id: str, attempt: int, step: str, owner: str, **fields) -> dict:
    """The event `<job>/<attempt>/<step>`, taken by `owner` (a unique `_id`: one process wins)."""
    return {"_id": guard_key(job_id, attempt, step), "owner": owner, "job_id": job_id, "attempt": attempt,
            "step": step, **fields}


def settle_event(job_id: str, attempt: int, changes: dict, error: dict | None, owner: str) -> dict:
    """The event that ends an attempt: its state and retry time, the rest of its changes, its error."""
    rest = {k: v for k, v in changes.items() if k not in ("state", "retry_at")}
    return step_event(job_id, attempt, "settle", owner, state=changes["state"], retry_at=changes.get("retry_at"),
                      changes=rest, error=error)


class OutcomeStore:
    """Reads and writes job records; the only module that talks to MongoDB."""

    def __init__(self, client: pymongo.MongoClient, db_name: str):
        self.client = client
        self.db = client[db_name]
        self.jobs = self.db["jobs"]
        self.events = self.db["events"]
        self.leases = self.db["leases"]
        self.retries = self.db["retries"]

    @mongo_call
    def ensure_indexes(self) -> None:
        """Indexes for reading a job's events, listing by time, and the sweeps."""
        self.jobs.create_index([("submitted_at", -1)])
        self.events.create_index([("job_id", 1)])
        self.leases.create_index([("until", 1)])
        self.leases.create_index([("worker", 1)])
        self.leases.create_index([("job_id", 1)])
        self.retries.create_index([("at", 1)])

    @mongo_call
    def insert_many(self, jobs: list[tuple[str, JobSpec]], now: datetime) -> list[dict]:
        """Record new jobs, before they are enqueued, in one insert; returns their documents."""
        documents = [{"_id": job_id, "code": spec.code, "input_json": spec.input_json, "entry": spec.entry,
                      "timeout_s": spec.timeout_s, "limits": spec.limits.to_dict(), "retries": spec.retries,
                      "submitted_at": now} for job_id, spec in jobs]
        self.jobs.insert_many([dict(job) for job in documents])  # copies: pymongo adds nothing to ours
        return documents

    @mongo_call
    def get(self, job_id: str) -> dict | None:
        """The job as of now (see `derive`), or None for an unknown id.

        Reads by exact `_id` only, attempt after attempt until the one in play: FerretDB
        1.24 (SQLite) filters by `_id` in SQL and by anything else only after decoding
        every document of the collection (measured: 40 ms for a job's events among
        3,000), so a job with one attempt costs two or three lookups.
        """
        job = self.jobs.find_one({"_id": job_id})
        if job is None:
            return None
        events, attempt = [], 0
        while True:
            attempt += 1
            # the lease first: it is dropped only after the settle event is written, so this
            # order never sees an attempt that has neither while it has one or the other
            lease = self.leases.find_one({"_id": guard_key(job_id, attempt, "lease")})
            settle = self.events.find_one({"_id": guard_key(job_id, attempt, "settle")})
            if settle is None:
                return derive(job, events, [lease] if lease else [])
            events.append(settle)
            if settle["state"] in (JobState.COMPLETED.value, JobState.CANCELLED.value):
                return derive(job, events, [])
            if settle["state"] == JobState.FAILED.value:
                reopen = self.events.find_one({"_id": guard_key(job_id, attempt, "reopen")})
                if reopen is None:
                    return derive(job, events, [])
                events.append(reopen)

    @mongo_call
    def exists(self, job_id: str) -> bool:
        return self.jobs.find_one({"_id": job_id}, {"_id": 1}) is not None

    @mongo_call
    def claim(self, job_id: str, attempt: int, worker: str, now: datetime, lease_until: datetime) -> bool:
        """Start attempt `attempt` of a job for `worker`; False if it was taken before.

        The lease goes first, so an attempt claimed here always has one: if this worker dies
        at any point from here on, the recovery sweep finds the lease expire and settles
        the attempt as lost. The claim event is permanent and strict (not even the same
        worker may take it twice), so a duplicate message for an attempt that already
        ran, or one withdrawn (`withdraw`), cannot run it again.
        """
        lease = guard_key(job_id, attempt, "lease")
        try:
            self.leases.insert_one({"_id": lease, "job_id": job_id, "attempt": attempt, "worker": worker,
                                    "until": lease_until, "started_at": now})
        except DuplicateKeyError:
            return False  # running elsewhere now
        if not self._insert_event(job_id, attempt, "claim", worker, at=now):
            self.leases.delete_one({"_id": lease})
            return False
        return True

    @mongo_call
    def withdraw(self, job_id: str) -> None:
        """Remove a job that was never acknowledged to its caller (its enqueue failed).

        Its first attempt is claimed for nobody first: if the message reached Redis after
        all (the answer was lost), no worker can run it.
        """
        self.fence(job_id, 1, WITHDRAWN)
        self.jobs.delete_one({"_id": job_id})

    @mongo_call
    def fence(self, job_id: str, attempt: int, owner: str) -> bool:
        """Claim an attempt for nobody, so no worker ever runs it (a cancel before it started);
        False if it was claimed before (by a worker, or fenced already)."""
        return self._insert_event(job_id, attempt, "claim", owner)

    @mongo_call
    def step_taken(self, job_id: str, attempt: int, step: str) -> dict | None:
        """Who took a step of an attempt, or None: the event's `owner` (for "claim": a worker's
        name, or a fence's), `run` (a claim written with its settle) and `at` (an enqueue: when
        its retry was taken, `take_retry`)."""
        return self.events.find_one({"_id": guard_key(job_id, attempt, step)}, {"owner": 1, "run": 1, "at": 1})

    def taken_by(self, job_id: str, attempt: int, step: str) -> str | None:
        """The owner of a step of an attempt (`step_taken`), or None."""
        held = self.step_taken(job_id, attempt, step)
        return held.get("owner") if held else None

    @mongo_call
    def request_cancel(self, job_id: str, attempt: int, owner: str, now: datetime) -> None:
        """Note, durably, that the running attempt is to be cancelled: whoever settles it
        as lost, or as failed with retries left, cancels the job instead."""
        self._insert_event(job_id, attempt, "cancel", owner, at=now)

    @mongo_call
    def cancel_requested(self, job_id: str, attempt: int) -> bool:
        return self.events.find_one({"_id": guard_key(job_id, attempt, "cancel")}, {"_id": 1}) is not None

    @mongo_call
    def renew_lease(self, job_id: str, attempt: int, worker: str, until: datetime) -> None:
        """Say that `worker` still runs this attempt, until `until`.

        Only the attempt's own worker writes its lease, so a stale worker's renewal
        cannot extend the next attempt's.
        """
        self.leases.update_one({"_id": guard_key(job_id, attempt, "lease"), "worker": worker},
                               {"$set": {"until": until}})

    @mongo_call
    def expired_leases(self, now: datetime, limit: int = 100) -> list[dict]:
        """Leases nobody renewed in time: their worker, on whatever host, is gone."""
        return list(self.leases.find({"until": {"$lt": now}}).limit(limit))

    @mongo_call
    def leases_of(self, worker: str) -> list[dict]:
        """The attempts a given worker holds, to recover when that worker is gone."""
        return list(self.leases.find({"worker": worker}))

    @mongo_call
    def settle_many(self, events: list[dict], owner: str, claims: list[dict | None] | None = None) -> list:
        """End attempts with their settle events (`settle_event`), in one ordered insert; for
        each, the event that stands for this owner, None if somebody else settled it first,
        or False if somebody else claimed it: this owner's run of it never counted.

        `claims` (parallel to `events`: a claim `step_event`, or None) are claims that go in just
        before their settle, for an attempt that ended before its claim was written (see
        worker.AttemptRunner): an ordered insert stops at a claim taken before, so that
        attempt's settle is never written, and goes on from the next attempt.

        Whoever settles an attempt first wins: the worker reporting its outcome, or a
        sweeper that found its worker gone; a stale attempt can never overwrite what a
        later attempt wrote, since every attempt has its own event. An owner that finds
        its own event (an earlier try went through, and what followed it failed) gets
        that stored event back, marked `"again": True`: it, not the one built now, is
        the outcome, and it was announced before. A claim found written by the same run
        (its `run`: an earlier try went through) lets its settle go on; one by any other
        run, even of the same worker (a duplicate message), does not.
        """
        claims = claims or [None] * len(events)
        documents = [(i, document) for i, (event, claim) in enumerate(zip(events, claims))
                     for document in ([claim] if claim else []) + [event]]
        standing: list = list(events)
        start = 0
        while start < len(documents):
            try:
                self.events.insert_many([dict(document) for _, document in documents[start:]], ordered=True)
                break
            except BulkWriteError as e:
                errors = e.details.get("writeErrors") or [{}]
                if errors[0].get("code") != DUPLICATE_KEY:
                    raise
                error = errors[0]
                start += error["index"]
                i, document = documents[start]
                if document["step"] == "settle":
                    standing[i] = self._own_event(document["_id"], owner)
                elif not self._same_run(document):  # claimed elsewhere, or by another run: skip its settle
                    standing[i] = False
                    start += 1
                start += 1
        return standing

    def settle(self, job_id: str, attempt: int, changes: dict, error: dict | None, owner: str) -> dict | None:
        """End one attempt (see `settle_many`)."""
        return self.settle_many([settle_event(job_id, attempt, changes, error, owner)], owner)[0]

    @mongo_call
    def drop_leases(self, attempts: list[tuple[str, int]]) -> None:
        """Drop the leases of settled attempts (`leases` is small: one scan for all)."""
        keys = [guard_key(job_id, attempt, "lease") for job_id, attempt in attempts]
        if len(keys) == 1:
            self.leases.delete_one({"_id": keys[0]})
        elif keys:
            self.leases.delete_many({"_id": {"$in": keys}})

    @mongo_call
    def reopen(self, job_id: str, attempts: int, owner: str, now: datetime) -> bool:
        """Make a failed job wait for one more attempt (a manual retry); False if it was reopened
        before (strict: a second request from the same daemon gets False too)."""
        return self._insert_event(job_id, attempts, "reopen", owner, retries=attempts, at=now)

    @mongo_call
    def schedule_retry(self, job_id: str, attempts: int, at: datetime, reopened: bool = False) -> None:
        """Note a retry to enqueue at `at`, in a small collection the sweep can read cheaply;
        `reopened`: a failed job retried by hand, which no earlier cancel request stops."""
        self.retries.replace_one({"_id": guard_key(job_id, attempts, "retry")},
                                 {"job_id": job_id, "attempts": attempts, "at": at, "reopened": reopened}, upsert=True)

    @mongo_call
    def due_retries(self, now: datetime, limit: int = 1000) -> list[dict]:
        """Retries whose time has come (each may already be on its way)."""
        return list(self.retries.find({"at": {"$lte": now}}).limit(limit))

    @mongo_call
    def forget_retry(self, job_id: str, attempts: int) -> None:
        self.retries.delete_one({"_id": guard_key(job_id, attempts, "retry")})

    @mongo_call
    def take_retry(self, job_id: str, attempts: int, owner: str) -> bool:
        """Become the one sweeper that enqueues this retry (noting when: `step_taken`)."""
        taken = self._insert_event(job_id, attempts, "enqueue", owner, at=datetime.now(timezone.utc))
        return taken or self._owned_by(guard_key(job_id, attempts, "enqueue"), owner)

    @mongo_call
    def release_retry(self, job_id: str, attempts: int) -> None:
        """Give a taken retry back (its enqueue failed) so a later sweep tries again (rare)."""
        self.events.delete_one({"_id": guard_key(job_id, attempts, "enqueue")})

    def _insert_event(self, job_id: str, attempt: int, step: str, owner: str, **fields) -> bool:
        """Insert the event `<job>/<attempt>/<step>`; False if it exists (a unique `_id`
        lets exactly one process take each step)."""
        try:
            self.events.insert_one(step_event(job_id, attempt, step, owner, **fields))
            return True
        except DuplicateKeyError:
            return False

    def _same_run(self, claim: dict) -> bool:
        """Whether the stored claim with this one's `_id` was written by the same run."""
        held = self.events.find_one({"_id": claim["_id"]}, {"run": 1})
        return bool(held and claim.get("run") and held.get("run") == claim["run"])

    def _owned_by(self, key: str, owner: str) -> bool:
        """Whether `owner` holds an event already: its earlier insert went through but the
        answer was lost, so it has won."""
        return self._own_event(key, owner) is not None

    def _own_event(self, key: str, owner: str) -> dict | None:
        """The stored event if `owner` holds it (marked `again`), else None."""
        held = self.events.find_one({"_id": key})
        return {**held, "again": True} if held is not None and held.get("owner") == owner else None

    @mongo_call
    def all_jobs(self, full: bool = False) -> list[dict]:
        """Every job as of now, each collection read once (never on a job's path).

        Without `full`, events are read without their outcome (no result, output or
        times): enough for states and attempts.
        """
        leases: dict[str, list[dict]] = {}
        for lease in self.leases.find({}):  # before the events, as in `get`
            leases.setdefault(lease["job_id"], []).append(lease)
        events: dict[str, list[dict]] = {}
        for event in self.events.find({}, None if full else EVENT_SUMMARY):
            events.setdefault(event["job_id"], []).append(event)
        return [derive(job, events.get(job["_id"], []), leases.get(job["_id"], []))
                for job in self.jobs.find({}, {"code": 0, "input_json": 0})]

    @mongo_call
    def recent(self, limit: int, since: datetime | None = None, state: str | None = None) -> list[dict]:
        """The newest jobs (submitted at or after `since`), as of now, without code, input or
        output; only those in `state` when given. For operators (`GET /jobs`), not a job's path:
        FerretDB decodes every event to filter them by job."""
        found = self.jobs.find({"submitted_at": {"$gte": since}} if since else {},
                               {"code": 0, "input_json": 0}).sort("submitted_at", -1)
        if state is None:
            found = found.limit(limit)  # every job listed is wanted: no need to read more
        jobs, listed = list(found), []
        for start in range(0, len(jobs), LIST_BATCH):
            batch = jobs[start:start + LIST_BATCH]
            ids = {"job_id": {"$in": [job["_id"] for job in batch]}}
            leases: dict[str, list[dict]] = {}
            for lease in self.leases.find(ids):  # before the events, as in `get`
                leases.setdefault(lease["job_id"], []).append(lease)
            events: dict[str, list[dict]] = {}
            for event in self.events.find(ids, EVENT_WITHOUT_OUTPUT):
                events.setdefault(event["job_id"], []).append(event)
            for job in batch:
                now = derive(job, events.get(job["_id"], []), leases.get(job["_id"], []))
                if state is None or now["state"] == state:
                    listed.append(now)
                if len(listed) == limit:
                    return listed
        return listed

    def waiting(self) -> list[dict]:
        """Every job waiting for a worker (queued, or a retry, due or not).

        Reads every job: the full orphan scan runs when a daemon starts, after Redis lost data
        or restarted, and once an hour (recovery.Recovery.sweep), never on a job's path.
        """
        return [job for job in self.all_jobs() if job["state"] == JobState.SUBMITTED.value]

    @mongo_call
    def ping(self) -> None:
        self.client.admin.command("ping")

    @mongo_call
    def collection_names(self) -> list[str]:
        return sorted(self.db.list_collection_names())
