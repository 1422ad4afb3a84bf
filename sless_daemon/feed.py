"""A job's live feed: a short-lived Redis stream of its state changes and output.

Workers append to it (an attempt started, output as it is written), and whoever
settles an attempt (a worker, a sweeper, the daemon cancelling a job) appends how it
ended, in the settle's announcement (queue.announce_settled). The daemon reads it
for `GET /events` (a long poll: XREAD blocks until something is appended) and `GET
/logs`, so `sless status --watch` and `sless logs --follow` wait on Redis instead of
polling MongoDB. MongoDB stays the record: a feed is capped at FEED_MAX_ENTRIES and
expires FEED_TTL_S after its last entry (ENDED_TTL_S once the job has ended), and losing one (Redis restarted) only means
watchers fall back to the status document.

Entries are flat string fields: `kind` ("state" or "output"), `attempt`, and `state`
and `worker` for a state, `stream` and `text` for output.
"""

from __future__ import annotations

import codecs
import re
import time

import redis

from .errors import BadRequest, redis_call

FEED_KEY = "sless:feed:"  # + job id
FEED_TTL_S = 3600
ENDED_TTL_S = 60
ENDED_STATES = ("completed", "failed", "cancelled")
FEED_MAX_ENTRIES = 10000  # approximate (XADD MAXLEN ~): output is coalesced into few entries
START = "0-0"  # the cursor before the first entry
CURSOR = re.compile(r"^\d{1,20}-\d{1,20}$")
OUTPUT_FLUSH_S = 0.1  # a job's output reaches its followers at most this late
OUTPUT_FLUSH_BYTES = 16 << 10
MAX_READ = 1000  # entries per read
BLOCK_SLICE_S = 2.0


def feed_key(job_id: str) -> str:
    return FEED_KEY + job_id


def append(pipe, job_id: str, entry: dict) -> None:
    """Queue one entry on a pipeline (and renew the feed's expiry: short once the job ended,
    since only followers already waiting still need it, and the record has the rest)."""
    fields = {k: ("" if v is None else str(v)) for k, v in entry.items()}
    pipe.xadd(feed_key(job_id), fields, maxlen=FEED_MAX_ENTRIES, approximate=True)
    ended = entry.get("kind") == "state" and entry.get("state") in ENDED_STATES
    pipe.expire(feed_key(job_id), ENDED_TTL_S if ended else FEED_TTL_S)


def state_entry(attempt: int, state: str, worker: str | None = None) -> dict:
    return {"kind": "state", "attempt": attempt, "state": state, "worker": worker}


def check_cursor(cursor: str) -> str:
    if not CURSOR.match(cursor) or max(int(part) for part in cursor.split("-")) >= 1 << 64:
        raise BadRequest(f"The cursor {cursor[:64]!r} is not one this API gave (like '1700000000000-0').")
    return cursor


def _event(entry_id: bytes, fields: dict) -> dict:
    """A feed entry as the API shows it."""
    event = {k.decode(): v.decode("utf-8", errors="replace") for k, v in fields.items()}
    event["id"] = entry_id.decode()
    event["attempt"] = int(event.get("attempt") or 0)
    if event.get("kind") == "state":
        event["worker"] = event.get("worker") or None
    return event


class Feed:
    """Reads and writes job feeds on one Redis connection."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection

    @redis_call
    def publish(self, job_id: str, entry: dict) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            append(pipe, job_id, entry)
            pipe.execute()

    @redis_call
    def read(self, job_id: str, after: str, wait_s: float) -> tuple[list[dict], str]:
        """Entries after `after`, waiting up to `wait_s` for the first; and the new cursor.

        Waits in slices shorter than the client's socket timeout (3 s), as /execute does.
        """
        check_cursor(after)
        deadline = time.monotonic() + wait_s
        while True:
            block_ms = int(min(deadline - time.monotonic(), BLOCK_SLICE_S) * 1000)
            found = self.connection.xread({feed_key(job_id): after}, count=MAX_READ,
                                          block=block_ms if block_ms >= 1 else None)
            events = [_event(entry_id, fields) for _, entries in found or [] for entry_id, fields in entries]
            if events or block_ms < 1:
                return events, events[-1]["id"] if events else after

    @redis_call
    def history(self, job_id: str) -> tuple[list[dict], str]:
        """Every entry the feed holds, and the cursor after the last."""
        events = [_event(entry_id, fields) for entry_id, fields in self.connection.xrange(feed_key(job_id))]
        return events, events[-1]["id"] if events else START

    @redis_call
    def exists(self, job_id: str) -> bool:
        return bool(self.connection.exists(feed_key(job_id)))


class OutputFeed:
    """Publishes an attempt's output as it is written, coalesced into few entries.

    Fed by the capture loop with the bytes it keeps (capped like the stored output);
    flushed at most every OUTPUT_FLUSH_S or OUTPUT_FLUSH_BYTES, and at the end. A job
    that writes nothing costs nothing. A Redis failure stops the feed, never the attempt.
    """

    def __init__(self, feed: Feed, job_id: str, attempt: int):
        self.feed = feed
        self.job_id = job_id
        self.attempt = attempt
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self.pending: list[tuple[str, str]] = []
        self.pending_bytes = 0
        self.flushed_at = time.monotonic()
        self.broken = False

    def add(self, stream: str, data: bytes) -> None:
        text = self.decoders[stream].decode(data)
        if text:
            self.pending.append((stream, text))
            self.pending_bytes += len(data)

    def flush(self, final: bool = False) -> None:
        if final:
            for stream, decoder in self.decoders.items():
                tail = decoder.decode(b"", final=True)
                if tail:
                    self.pending.append((stream, tail))
        due = final or self.pending_bytes >= OUTPUT_FLUSH_BYTES or time.monotonic() - self.flushed_at >= OUTPUT_FLUSH_S
        if not self.pending or not due or self.broken:
            return
        merged: list[tuple[str, str]] = []
        for stream, text in self.pending:
            if merged and merged[-1][0] == stream:
                merged[-1] = (stream, merged[-1][1] + text)
            else:
                merged.append((stream, text))
        self.pending, self.pending_bytes, self.flushed_at = [], 0, time.monotonic()
        try:
            with self.feed.connection.pipeline(transaction=False) as pipe:
                for stream, text in merged:
                    append(pipe, self.job_id, {"kind": "output", "attempt": self.attempt, "stream": stream,
                                               "text": text})
                pipe.execute()
        except redis.RedisError:
            self.broken = True  # the stored output is complete anyway; followers read it at the end
