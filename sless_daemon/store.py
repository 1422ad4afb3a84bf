"""The durable record of every job: one document per job in MongoDB's `jobs` collection.

Inputs and results are stored as JSON text (`input_json`, `result_json`) so any JSON
value round-trips exactly: BSON cannot hold integers past 64 bits, and MongoDB
servers differ on keys with dots or dollars. Every state change after submission is
a conditional update fenced by the attempt number, so an attempt that was given up
on can never overwrite what a later attempt wrote.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta

import pymongo
from pymongo import ReturnDocument
from pymongo.errors import ConnectionFailure

from .errors import DependencyDown
from .spec import JobSpec
from .states import JobState

MONGO = "MongoDB"


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
        url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=max(ms, 10_000),
        tz_aware=True, appname="sless",
    )


class OutcomeStore:
    """Reads and writes job documents; the only module that talks to MongoDB."""

    def __init__(self, client: pymongo.MongoClient, db_name: str):
        self.client = client
        self.db = client[db_name]
        self.jobs = self.db["jobs"]

    @mongo_call
    def ensure_indexes(self) -> None:
        """Indexes for listing by state and time, and for finding lost attempts."""
        self.jobs.create_index([("state", 1), ("submitted_at", -1)])
        self.jobs.create_index([("submitted_at", -1)])
        self.jobs.create_index([("state", 1), ("lease_until", 1)])
        self.jobs.create_index([("worker", 1)])
        self.jobs.create_index([("state", 1), ("retry_at", 1)])

    @mongo_call
    def insert(self, job_id: str, spec: JobSpec, now: datetime) -> None:
        """Record a new job as submitted, before it is enqueued."""
        self.jobs.insert_one({
            "_id": job_id, "state": JobState.SUBMITTED.value, "code": spec.code,
            "input_json": json.dumps(spec.input), "entry": spec.entry, "timeout_s": spec.timeout_s,
            "memory_mb": spec.memory_mb, "retries": spec.retries, "attempts": 0, "submitted_at": now,
            "started_at": None, "finished_at": None, "duration_ms": None, "result_json": None,
            "error": None, "attempt_errors": [], "stdout": "", "stderr": "", "worker": None,
            "lease_until": None, "retry_at": None,
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
        """Start the next attempt if the job is waiting; None if it is not (a duplicate delivery).

        Returns the job document after the update, with `attempts` already counting
        this attempt; that number fences every later write of the attempt. The lease
        says when the attempt must have ended; past it, the worker counts as lost.
        """
        lease_until = now + timedelta(seconds=lease_s)
        return self.jobs.find_one_and_update(
            {"_id": job_id, "state": JobState.SUBMITTED.value},
            {"$set": {"state": JobState.RUNNING.value, "worker": worker, "started_at": now,
                      "lease_until": lease_until, "retry_at": None},
             "$inc": {"attempts": 1}},
            return_document=ReturnDocument.AFTER,
        )

    @mongo_call
    def finish(self, job_id: str, attempt: int, state: JobState, fields: dict) -> bool:
        """Write an attempt's terminal outcome; False if that attempt no longer owns the job."""
        update = {"$set": {"state": state.value, "lease_until": None, **fields}}
        if fields.get("error"):
            update["$push"] = {"attempt_errors": {"attempt": attempt, **fields["error"]}}
        done = self.jobs.update_one({"_id": job_id, "state": JobState.RUNNING.value, "attempts": attempt}, update)
        return done.modified_count == 1

    @mongo_call
    def requeue(self, job_id: str, attempt: int, error: dict, fields: dict, retry_at: datetime) -> bool:
        """Put a failed attempt's job back to waiting for its next attempt; False if fenced out."""
        done = self.jobs.update_one(
            {"_id": job_id, "state": JobState.RUNNING.value, "attempts": attempt},
            {"$set": {"state": JobState.SUBMITTED.value, "error": error, "lease_until": None,
                      "worker": None, "retry_at": retry_at, **fields},
             "$push": {"attempt_errors": {"attempt": attempt, **error}}},
        )
        return done.modified_count == 1

    @mongo_call
    def take_due_retry(self, now: datetime) -> dict | None:
        """Atomically take one job whose retry time has come, so one sweeper enqueues it."""
        return self.jobs.find_one_and_update(
            {"state": JobState.SUBMITTED.value, "retry_at": {"$lte": now}},
            {"$set": {"retry_at": None}},
        )  # no projection: FerretDB 1.24 does not implement findAndModify's "fields"

    @mongo_call
    def reschedule(self, job_id: str, retry_at: datetime) -> None:
        """Give a taken retry back (its enqueue failed) so a later sweep tries again."""
        self.jobs.update_one({"_id": job_id, "state": JobState.SUBMITTED.value}, {"$set": {"retry_at": retry_at}})

    @mongo_call
    def running_on(self, worker: str) -> list[dict]:
        """Jobs a given worker holds, to recover when that worker is gone."""
        return list(self.jobs.find({"state": JobState.RUNNING.value, "worker": worker}))

    @mongo_call
    def expired_leases(self, now: datetime, limit: int = 100) -> list[dict]:
        """Running jobs whose attempt should have ended long ago: their worker is lost."""
        return list(self.jobs.find({"state": JobState.RUNNING.value, "lease_until": {"$lt": now}}).limit(limit))

    @mongo_call
    def ping(self) -> None:
        self.client.admin.command("ping")

    @mongo_call
    def collection_names(self) -> list[str]:
        return sorted(self.db.list_collection_names())
