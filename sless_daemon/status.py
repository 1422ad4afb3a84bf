"""The public shape of a job: the status document every endpoint and command shows."""

from __future__ import annotations

import json
from datetime import datetime


def status_document(job: dict) -> dict:
    """Turn a stored job into the JSON the API returns (jobId, state, result, error, ...)."""
    return {
        "jobId": job["_id"],
        "state": job["state"],
        "result": json.loads(job["result_json"]) if job.get("result_json") is not None else None,
        "error": job.get("error"),
        "attempts": job.get("attempts", 0),
        "max_attempts": job.get("retries", 0) + 1,
        "attempt_errors": [{**e, "at": iso(e.get("at"))} for e in job.get("attempt_errors", [])],
        "stdout": job.get("stdout", ""),
        "stderr": job.get("stderr", ""),
        "submitted_at": iso(job.get("submitted_at")),
        "started_at": iso(job.get("started_at")),
        "finished_at": iso(job.get("finished_at")),
        "duration_ms": job.get("duration_ms"),
        "retry_at": iso(job.get("retry_at")),
        "worker": job.get("worker"),
        "limits": {**job.get("limits", {}), "retries": job.get("retries")},
        "timings": job.get("timings"),  # epoch seconds of the last attempt's stages, as the worker saw them
    }


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, or None."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


SUMMARY_FIELDS = ("jobId", "state", "attempts", "max_attempts", "submitted_at", "started_at", "finished_at",
                  "duration_ms", "worker", "error")


def summary_document(job: dict) -> dict:
    """A job in a listing (`GET /jobs`): the status document without result, output or limits."""
    document = status_document({**job, "result_json": None})
    return {field: document[field] for field in SUMMARY_FIELDS}
