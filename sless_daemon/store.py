"""The durable record of every job: one document per job in MongoDB's `jobs` collection.

Inputs and results are stored as JSON text (`input_json`, `result_json`) so any JSON
value round-trips exactly: BSON cannot hold integers past 64 bits, and MongoDB
servers differ on keys with dots or dollars.

Every change of an attempt (claim it, settle it, enqueue its retry) is guarded by
inserting a document with a unique `_id` into `guards` (`<job>/<attempt>/<step>`):
exactly one process succeeds. We do not rely on conditional updates for this:
FerretDB 1.24 (SQLite) applies `update_one`/`findAndModify` filters without
isolation, so two concurrent callers can both "match" (measured: 216 wins for 200
documents with 4 threads), while unique inserts hold (300 of 300).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta

import pymongo
from pymongo.errors import ConnectionFailure, DuplicateKeyError

from .errors import DependencyDown
from .spec import JobSpec
from .states import JobState

MONGO = "MongoDB"
SOCKET_TIMEOUT_MS = 4000  # well under a lease (10 s): a stalled renewal fails and the next one comes


def guard_key(job_id: str, attempt: int, step: str) -> str:
    """The `_id` that only one process may insert: e.g. `<job>/2/claim`."""
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


class OutcomeStore:
    """Reads and writes job documents; the only module that talks to MongoDB."""

    def __init__(self, client: pymongo.MongoClient, db_name: str):
        self.client = client
        self.db = client[db_name]
        self.jobs = self.db["jobs"]
        self.guards = self.db["guards"]
        self.leases = self.db["leases"]
        self.retries = self.db["retries"]

    @mongo_call
    def ensure_indexes(self) -> None:
        """Indexes for listing by state and time, and for finding lost attempts."""
        self.jobs.create_index([("state", 1), ("submitted_at", -1)])
        self.jobs.create_index([("submitted_at", -1)])
        self.jobs.create_index([("worker", 1)])
        self.leases.create_index([("until", 1)])
        self.retries.create_index([("at", 1)])

    @mongo_call
    def insert(self, job_id: str, spec: JobSpec, now: datetime) -> None:
        """Record a new job as submitted, before it is enqueued."""
        self.jobs.insert_one({
            "_id": job_id, "state": JobState.SUBMITTED.value, "code": spec.code,
            "input_json": json.dumps(spec.input), "entry": spec.entry, "timeout_s": spec.timeout_s,
            "limits": spec.limits.to_dict(), "retries": spec.retries, "attempts": 0, "submitted_at": now,
            "started_at": None, "finished_at": None, "duration_ms": None, "result_json": None,
            "error": None, "attempt_errors": [], "stdout": "", "stderr": "", "worker": None, "retry_at": None,
        })

    @mongo_call
    def delete(self, job_id: str) -> None:
        """Remove a job that was never acknowledged to its caller (enqueue failed)."""
        self.jobs.delete_one({"_id": job_id, "attempts": 0})

    @mongo_call
    def get(self, job_id: str) -> dict | None:
        return self.jobs.find_one({"_id": job_id})

    @mongo_call
    def claim(self, job_id: str, worker: str, now: datetime, lease_s: float) -> dict | None:
        """Start the job's next attempt for `worker`; None if it is not waiting (a duplicate delivery).

        Returns the job document as updated, with `attempts` counting this attempt;
        that number fences every later write of the attempt. The lease says when the
        attempt must have ended; past it, the worker counts as lost.
        """
        job = self.jobs.find_one({"_id": job_id})
        if job is None or job["state"] != JobState.SUBMITTED.value:
            return None
        if job.get("retry_at") and job["retry_at"] > now:
            return None  # a retry that is not due yet; the retry sweep enqueues it on time
        attempt = job["attempts"] + 1
        lease_until = now + timedelta(seconds=lease_s)
        if not self._take_claim(job_id, attempt, worker, now, lease_until):
            return None
        self.renew_lease(job_id, attempt, worker, lease_until)  # before the state: a running job has a lease
        changes = {"state": JobState.RUNNING.value, "attempts": attempt, "worker": worker, "started_at": now,
                   "retry_at": None}
        self.jobs.update_one({"_id": job_id}, {"$set": changes})
        return {**job, **changes}

    @mongo_call
    def renew_lease(self, job_id: str, attempt: int, worker: str, until: datetime) -> None:
        """Say that `worker` still runs this attempt, until `until`.

        Leases live in their own collection, one per attempt, written only by that
        attempt's worker: a renewal never races with another writer of the job document
        (FerretDB loses one of two concurrent updates of a document, measured), and a
        stale worker's renewal cannot extend the next attempt's lease.
        """
        self.leases.replace_one({"_id": guard_key(job_id, attempt, "lease")},
                                {"job_id": job_id, "attempt": attempt, "worker": worker, "until": until}, upsert=True)

    @mongo_call
    def drop_lease(self, job_id: str, attempt: int) -> None:
        self.leases.delete_one({"_id": guard_key(job_id, attempt, "lease")})

    @mongo_call
    def expired_leases(self, now: datetime, limit: int = 100) -> list[dict]:
        """Leases nobody renewed in time: their worker, on whatever host, is gone."""
        return list(self.leases.find({"until": {"$lt": now}}).limit(limit))

    def _take_claim(self, job_id: str, attempt: int, worker: str, now: datetime, lease_until: datetime) -> bool:
        """Win attempt `attempt` of a job, or learn that another worker did.

        A claimer that died between winning and updating the job leaves its guard
        behind with the job still waiting; once that guard's lease has passed, the
        guard is removed and the claim tried once more.
        """
        key = guard_key(job_id, attempt, "claim")
        if self._take(key, worker, lease_until=lease_until):
            return True
        if self.guards.delete_one({"_id": key, "lease_until": {"$lt": now}}).deleted_count:
            return self._take(key, worker, lease_until=lease_until)
        return False

    @mongo_call
    def settle(self, job_id: str, attempt: int, changes: dict, error: dict | None, owner: str) -> bool:
        """End attempt `attempt` with `changes`; False if somebody else settled it first.

        Whoever settles an attempt first wins: the worker reporting its outcome, or a
        sweeper that found its worker gone; a stale attempt can never overwrite what a
        later attempt wrote. The winner's changes are kept in its guard, so a settle
        cut short (a crash between guard and update) is finished by the next caller,
        whoever it is; applying them twice changes nothing.
        """
        key = guard_key(job_id, attempt, "settle")
        won = self._take(key, owner, changes=changes, error=error)
        held = self.guards.find_one({"_id": key}) if not won else {"changes": changes, "error": error}
        update = {"$set": held["changes"]}
        if held.get("error"):
            update["$addToSet"] = {"attempt_errors": {"attempt": attempt, **held["error"]}}
        self.jobs.update_one({"_id": job_id, "attempts": attempt}, update)
        return won

    @mongo_call
    def reopen(self, job_id: str, attempts: int, owner: str) -> bool:
        """Make a failed job wait for one more attempt (a manual retry); False if another won."""
        if not self._take(guard_key(job_id, attempts, "reopen"), owner):
            return False
        self.jobs.update_one({"_id": job_id, "attempts": attempts}, {"$set": {
            "state": JobState.SUBMITTED.value, "retries": attempts, "finished_at": None, "retry_at": None,
            "worker": None}})
        return True

    @mongo_call
    def schedule_retry(self, job_id: str, attempts: int, timeout_s: float, at: datetime) -> None:
        """Note a retry to enqueue at `at`, in a small collection the sweep can read cheaply.

        (FerretDB filters most queries in its own process, so a query on `jobs` costs
        a scan of the jobs; `retries` holds only the retries that are waiting.)
        """
        self.retries.replace_one({"_id": guard_key(job_id, attempts, "retry")},
                                 {"job_id": job_id, "attempts": attempts, "timeout_s": timeout_s, "at": at},
                                 upsert=True)

    @mongo_call
    def due_retries(self, now: datetime, limit: int = 1000) -> list[dict]:
        """Retries whose time has come (each may already be on its way)."""
        return list(self.retries.find({"at": {"$lte": now}}).limit(limit))

    @mongo_call
    def forget_retry(self, job_id: str, attempts: int) -> None:
        self.retries.delete_one({"_id": guard_key(job_id, attempts, "retry")})

    @mongo_call
    def take_retry(self, job_id: str, attempts: int, owner: str) -> bool:
        """Become the one sweeper that enqueues this retry."""
        return self._take(guard_key(job_id, attempts, "enqueue"), owner)

    @mongo_call
    def release_retry(self, job_id: str, attempts: int) -> None:
        """Give a taken retry back (its enqueue failed) so a later sweep tries again."""
        self.guards.delete_one({"_id": guard_key(job_id, attempts, "enqueue")})

    def _take(self, key: str, owner: str, **fields) -> bool:
        """Insert a guard document; a unique `_id` lets exactly one owner succeed."""
        try:
            self.guards.insert_one({"_id": key, "owner": owner, **fields})
            return True
        except DuplicateKeyError:
            held = self.guards.find_one({"_id": key}, {"owner": 1})
            return held is not None and held.get("owner") == owner

    @mongo_call
    def running_on(self, worker: str) -> list[dict]:
        """Jobs a given worker holds, to recover when that worker is gone."""
        return list(self.jobs.find({"state": JobState.RUNNING.value, "worker": worker}))

    @mongo_call
    def waiting_since(self, before: datetime, limit: int = 2000) -> list[dict]:
        """Jobs waiting for a worker since before `before` (queued, or retries that are due).

        Only an equality filter goes to the server (the kind FerretDB can hand to
        SQLite); the time conditions are checked here.
        """
        found = self.jobs.find({"state": JobState.SUBMITTED.value},
                               {"_id": 1, "attempts": 1, "timeout_s": 1, "submitted_at": 1, "retry_at": 1})
        return [job for job in found.limit(limit)
                if job["submitted_at"] < before and (job.get("retry_at") is None or job["retry_at"] < before)]

    @mongo_call
    def ping(self) -> None:
        self.client.admin.command("ping")

    @mongo_call
    def collection_names(self) -> list[str]:
        return sorted(self.db.list_collection_names())
