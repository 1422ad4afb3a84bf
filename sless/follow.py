"""Following a job to its end through the daemon's long poll (`GET /events`).

The daemon answers as soon as the job's feed has something new (or after
EVENTS_WAIT_S), so a follower neither polls MongoDB nor sleeps between reads. On a
state change, and after every quiet wait (in case the feed was lost with a Redis
restart), the status document is read again: it stays the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .client import DaemonClient

TERMINAL = {"completed", "failed", "cancelled"}
EVENTS_WAIT_S = 25.0
START = "0-0"


@dataclass
class Change:
    """One thing that happened: a new status document, or output (a feed event)."""

    doc: dict
    output: dict | None = None


@dataclass
class Follower:
    client: DaemonClient
    doc: dict
    cursor: str = START
    wait_s: float = EVENTS_WAIT_S
    seen: tuple = field(default=())

    def changes(self):
        """Yield a Change for the document as it is, then for each change until the job ends."""
        self.seen = _key(self.doc)
        yield Change(self.doc)
        job_id = self.doc["jobId"]
        while self.doc["state"] not in TERMINAL:
            page = self.client.events(job_id, self.cursor, self.wait_s)
            self.cursor = page["cursor"]
            moved = not page["events"]
            for event in page["events"]:
                if event["kind"] == "output":
                    yield Change(self.doc, event)
                else:
                    moved = True
            if moved:
                self.doc = self.client.status(job_id)
                if _key(self.doc) != self.seen:
                    self.seen = _key(self.doc)
                    yield Change(self.doc)


def _key(doc: dict) -> tuple:
    return doc["state"], doc["attempts"]


def follow_to_end(client: DaemonClient, doc: dict) -> dict:
    """The job's final status document (used when /execute or /cancel answered before the end)."""
    follower = Follower(client, doc)
    for _ in follower.changes():
        pass
    return follower.doc
