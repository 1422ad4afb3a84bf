"""The worker's attempt watch (worker.AttemptWatch) against a real Redis feed: nothing of an
attempt is published before its claim stands, and a failed claim stops it."""

from __future__ import annotations

import concurrent.futures
import types
import uuid

from sless_daemon.feed import Feed
from sless_daemon.queue import JobQueue, connect_redis
from sless_daemon.worker import AttemptWatch, Claim
from stack import REDIS_URL


def claim_answering(future: concurrent.futures.Future) -> Claim:
    """A claim whose claimer thread's answer is `future`, set by the test."""
    runner = types.SimpleNamespace(claims=types.SimpleNamespace(submit=lambda *_: future), claim=None)
    return Claim(runner, {}, None, {}, {})


def watch_with_claim(hold_s: float = 0.0) -> tuple[AttemptWatch, concurrent.futures.Future, Feed, str]:
    """A watch whose claim is started at once (hold 0), or held back for `hold_s`."""
    connection = connect_redis(REDIS_URL)
    feed = Feed(connection)
    lifecycle = types.SimpleNamespace(queue=JobQueue(connection, f"watch-{uuid.uuid4().hex[:8]}"), feed=feed)
    answer: concurrent.futures.Future = concurrent.futures.Future()
    claim = claim_answering(answer)
    if not hold_s:
        claim.start()
    job_id = uuid.uuid4().hex
    recorder = types.SimpleNamespace(write_now=lambda: None)  # what the watch tells it: test_runner.py
    return AttemptWatch(lifecycle, job_id, 1, "w-test", claim, recorder, hold_s), answer, feed, job_id


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


def test_a_held_back_claim_starts_once_the_hold_is_over():
    watch, _, _, _ = watch_with_claim(hold_s=0.2)
    assert watch.interval_s == 0.2  # the capture loop wakes when the hold ends
    assert not watch.cancelled() and not watch.claim.started
    assert watch.ended_quiet_within_hold()  # were it to end now, its claim would go in with its settle
    watch.hold_until = 0.0  # the hold is over
    assert not watch.ended_quiet_within_hold()  # however late the capture loop looks
    assert not watch.cancelled()  # the claim is being written: the attempt goes on
    assert watch.claim.started and watch.interval_s == AttemptWatch.CANCEL_CHECK_S


def test_output_starts_a_held_back_claim_and_waits_for_it():
    watch, answer, feed, job_id = watch_with_claim(hold_s=60)
    watch.output("stdout", b"hello\n")
    assert watch.claim.started and not watch.ended_quiet_within_hold()
    assert kinds(feed, job_id) == []  # held until the claim stands
    answer.set_result(True)
    watch.done()
    assert kinds(feed, job_id) == [("state", "running"), ("output", "hello\n")]


def test_a_fork_server_start_starts_a_held_back_claim():
    watch, _, _, _ = watch_with_claim(hold_s=60)
    watch.sandbox_starting()
    assert watch.claim.started and not watch.ended_quiet_within_hold()
