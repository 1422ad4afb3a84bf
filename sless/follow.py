"""Following a job to its end through the daemon's long poll (`GET /events`).

The daemon answers as soon as the job's feed has something new (or after
EVENTS_WAIT_S), so a follower neither polls MongoDB nor sleeps between reads. On a
state change, and after every quiet wait (in case the feed was lost with a Redis
restart), the status document is read again: it stays the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .client import DaemonClient
from .errors import ApiError

TERMINAL = {"completed", "failed", "cancelled"}
EVENTS_WAIT_S = 25.0
START = "0-0"
UNAVAILABLE_PAUSE_S = 1.0


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
        """Yield a Change for the document as it is, then for each change until the job ends
        (with the output its feed still had after the end was seen)."""
        self.seen = _key(self.doc)
        yield Change(self.doc)
        while self.doc["state"] not in TERMINAL:
            events = self._next_events(self.wait_s)
            for event in events:
                if event["kind"] == "output":
                    yield Change(self.doc, event)
            if events is None or not events or any(event["kind"] == "state" for event in events):
                self.doc = self.client.status(self.doc["jobId"])
                if _key(self.doc) != self.seen:
                    self.seen = _key(self.doc)
                    yield Change(self.doc)
        for event in self._next_events(0) or []:  # written just before the end, read after it
            if event["kind"] == "output":
                yield Change(self.doc, event)

    def _next_events(self, wait_s: float) -> list[dict] | None:
        """The feed's next events; None when Redis is away (503): then the status document,
        read by the caller, is all there is, a second apart."""
        try:
            page = self.client.events(self.doc["jobId"], self.cursor, wait_s)
        except ApiError as e:
            if e.status != 503:
                raise
            time.sleep(UNAVAILABLE_PAUSE_S)
            return None
        self.cursor = page["cursor"]
        return page["events"]


def _key(doc: dict) -> tuple:
    return doc["state"], doc["attempts"]


def follow_to_end(client: DaemonClient, doc: dict) -> dict:
    """The job's final status document (used when /execute or /cancel answered before the end)."""
    follower = Follower(client, doc)
    for _ in follower.changes():
        pass
    return follower.doc
