"""The worker's attempt watch (worker.AttemptWatch) against a real Redis feed: nothing of an
attempt is published before its claim stands, and a failed claim stops it."""

from __future__ import annotations

import concurrent.futures
import types
import uuid

from sless_daemon.feed import Feed
from sless_daemon.queue import JobQueue, connect_redis
from sless_daemon.worker import AttemptWatch
from stack import REDIS_URL


def watch_with_claim() -> tuple[AttemptWatch, concurrent.futures.Future, Feed, str]:
    connection = connect_redis(REDIS_URL)
    feed = Feed(connection)
    lifecycle = types.SimpleNamespace(queue=JobQueue(connection, f"watch-{uuid.uuid4().hex[:8]}"), feed=feed)
    claim: concurrent.futures.Future = concurrent.futures.Future()
    job_id = uuid.uuid4().hex
    return AttemptWatch(lifecycle, job_id, 1, "w-test", claim), claim, feed, job_id


def kinds(feed: Feed, job_id: str) -> list[tuple]:
    return [(entry["kind"], entry.get("state") or entry.get("text")) for entry in feed.history(job_id)[0]]


def test_nothing_is_published_before_the_claim_and_a_lost_claim_stops_the_attempt():
    watch, claim, feed, job_id = watch_with_claim()
    watch.output("stdout", b"early\n")
    assert not watch.cancelled()  # the claim is still being written: the attempt goes on
    watch.done()
    assert kinds(feed, job_id) == []
    claim.set_result(False)  # a duplicate message: the attempt was claimed before
    assert watch.cancelled()
    watch.output("stdout", b"late\n")
    watch.done()
    assert kinds(feed, job_id) == []


def test_a_claim_that_raised_stops_the_attempt_and_publishes_nothing():
    watch, claim, feed, job_id = watch_with_claim()
    watch.output("stderr", b"x\n")
    claim.set_exception(RuntimeError("MongoDB went away"))
    assert watch.cancelled()
    watch.done()
    assert kinds(feed, job_id) == []


def test_once_the_claim_stands_what_was_held_goes_out_after_running():
    watch, claim, feed, job_id = watch_with_claim()
    watch.output("stdout", b"held\n")
    watch.done()  # the pipes' end came before the claim
    claim.set_result(True)
    watch.done()  # the runner's call once the claim stands
    assert kinds(feed, job_id) == [("state", "running"), ("output", "held\n")]
