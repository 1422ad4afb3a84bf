"""How the CLI shows things: data to stdout, talk to stderr, plain when piped."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

STATE_STYLES = {"submitted": "cyan", "running": "yellow", "completed": "green", "failed": "red",
                "cancelled": "magenta"}
TAIL_LINES = 8


def print_json(data) -> None:
    """One JSON document on stdout, unwrapped, for scripts."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def elapsed_s(doc: dict) -> float | None:
    """Seconds the job has run, or ran; None before it started."""
    if doc.get("duration_ms") is not None and doc.get("finished_at"):
        return doc["duration_ms"] / 1000
    if not doc.get("started_at"):
        return None
    started = datetime.fromisoformat(doc["started_at"].replace("Z", "+00:00"))
    return (datetime.now(timezone.utc) - started).total_seconds()


def status_line(doc: dict) -> str:
    """A one-line summary, used for plain (piped) progress."""
    seconds = elapsed_s(doc)
    timing = f" {seconds:.2f}s" if seconds is not None else ""
    return f"{doc['jobId']} {doc['state']} attempt {doc['attempts']}/{doc['max_attempts']}{timing}"


def status_view(doc: dict) -> Group:
    """The rich view of a job: state, attempts, time, result or error, output tail."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", doc["jobId"])
    table.add_row("state", Text(doc["state"], style=STATE_STYLES.get(doc["state"], "")))
    table.add_row("attempt", f"{doc['attempts']}/{doc['max_attempts']}")
    seconds = elapsed_s(doc)
    if seconds is not None:
        table.add_row("elapsed", f"{seconds:.3f} s")
    if doc["state"] == "completed":
        table.add_row("result", Text(json.dumps(doc["result"])))  # Text: the job's "[/x]" is no markup
    if doc.get("error"):
        table.add_row("error", Text(f"{doc['error']['type']}: {doc['error']['message']}", style="red"))
    parts = [table]
    for stream in ("stdout", "stderr"):
        tail = "\n".join((doc.get(stream) or "").rstrip("\n").splitlines()[-TAIL_LINES:])
        if tail:
            parts.append(Text(f"── {stream} ──", style="dim"))
            parts.append(Text(tail))
    return Group(*parts)


class LiveJob:
    """What `sless status --watch` shows while a job runs: rendered anew at every refresh
    of rich's Live (so the elapsed time ticks), with the tail of the running attempt's
    output from the job's feed; the stored output once it has ended."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.output = {"stdout": "", "stderr": ""}
        self.attempt = doc["attempts"]

    def update(self, doc: dict, event: dict | None) -> None:
        self.doc = doc
        if event is not None:
            if event["attempt"] != self.attempt:
                self.attempt, self.output = event["attempt"], {"stdout": "", "stderr": ""}
            kept = (self.output[event["stream"]] + event["text"]).splitlines(keepends=True)[-TAIL_LINES:]
            self.output[event["stream"]] = "".join(kept)

    def __rich__(self) -> Group:
        if self.doc["state"] in ("submitted", "running"):
            return status_view({**self.doc, **self.output})
        return status_view(self.doc)


def jobs_table(jobs: list[dict]) -> Table:
    """`sless list`: one row per job, newest first."""
    table = Table(title=f"{len(jobs)} jobs, newest first")
    for column in ("job", "state", "attempts", "submitted", "took", "worker", "error"):
        table.add_column(column, no_wrap=column in ("job", "submitted"))
    for job in jobs:
        took = f"{job['duration_ms'] / 1000:.3f} s" if job.get("duration_ms") is not None else ""
        error = f"{job['error']['type']}" if job.get("error") else ""
        table.add_row(job["jobId"], Text(job["state"], style=STATE_STYLES.get(job["state"], "")),
                      f"{job['attempts']}/{job['max_attempts']}", (job.get("submitted_at") or "").replace("T", " "),
                      took, job.get("worker") or "", error)
    return table


def health_table(health: dict, daemon_ms: float) -> Table:
    """Daemon, Redis, MongoDB, queue depth and live workers, each with its latency."""
    table = Table(title="sless health")
    for column in ("component", "status", "latency", "detail"):
        table.add_column(column)
    table.add_row("daemon", _ok("ok"), f"{daemon_ms:.1f} ms", f"version {health['daemon']['version']}")
    for name, key in (("redis", "redis"), ("mongodb", "mongodb")):
        check = health[key]
        detail = check.get("error", "") or (", ".join(check.get("collections", [])) and
                                             f"collections: {', '.join(check.get('collections', []))}")
        table.add_row(name, _ok(check["status"]), f"{check['latency_ms']:.1f} ms", Text(detail))
    queue = health["queue"]
    ok = queue["status"] == "ok"
    table.add_row("queue depth", _ok(queue["status"]), f"{queue['latency_ms']:.1f} ms",
                  str(queue.get("depth")) if ok else Text(queue.get("error", "")))
    table.add_row("live workers", _ok("ok" if ok and queue.get("live_workers") else "down"), "",
                  str(queue.get("live_workers")) if ok else "")
    return table


def _ok(status: str) -> Text:
    return Text(status, style="green" if status == "ok" else "red bold")
