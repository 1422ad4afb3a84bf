"""Autoscaling: the policy on its own, then a real pool growing with a burst and shrinking after it."""

from __future__ import annotations

import threading
import time

import pytest

from sless_daemon.autoscale import Autoscaler, Policy, QueueView, parse_range
from stack import wait_until

POLICY = Policy(minimum=1, maximum=6, jobs_per_worker=20, max_wait_s=1.0, idle_s=10.0, max_step=2)


def test_grows_with_depth_by_at_most_max_step_per_tick():
    scaler = Autoscaler(POLICY, now=0)
    assert scaler.decide(1, QueueView(depth=2000, oldest_wait_s=0.1, now=1)) == 3
    assert scaler.decide(3, QueueView(depth=1900, oldest_wait_s=0.5, now=2)) == 5
    assert scaler.decide(5, QueueView(depth=1800, oldest_wait_s=0.5, now=3)) == 6  # never above MAX
    assert scaler.decide(6, QueueView(depth=1700, oldest_wait_s=9.0, now=4)) == 6


def test_a_short_queue_that_waits_too_long_gets_one_more_worker():
    scaler = Autoscaler(POLICY, now=0)
    assert scaler.decide(2, QueueView(depth=3, oldest_wait_s=0.2, now=1)) == 2
    assert scaler.decide(2, QueueView(depth=3, oldest_wait_s=1.5, now=2)) == 3


def test_shrinks_one_at_a_time_only_after_the_queue_stayed_empty():
    scaler = Autoscaler(POLICY, now=0)
    scaler.decide(6, QueueView(depth=100, oldest_wait_s=0, now=100))
    assert scaler.decide(6, QueueView(depth=0, oldest_wait_s=0, now=105)) == 6  # idle 5 s < 10 s
    assert scaler.decide(6, QueueView(depth=0, oldest_wait_s=0, now=110)) == 5
    assert scaler.decide(5, QueueView(depth=0, oldest_wait_s=0, now=112)) == 5  # then one per idle_s / 2
    assert scaler.decide(5, QueueView(depth=0, oldest_wait_s=0, now=115)) == 4
    scaler.decide(1, QueueView(depth=0, oldest_wait_s=0, now=200))
    assert scaler.decide(1, QueueView(depth=0, oldest_wait_s=0, now=300)) == 1  # never below MIN


def test_a_pool_that_just_keeps_up_is_not_shrunk():
    """The queue empty at every tick, but most workers busy: shrinking would only bring the queue back."""
    scaler = Autoscaler(POLICY, now=0)
    assert scaler.decide(4, QueueView(depth=0, oldest_wait_s=0, now=100, busy=3)) == 4  # 3 of 3 left busy
    assert scaler.decide(4, QueueView(depth=0, oldest_wait_s=0, now=101, busy=2)) == 3  # 2 of 3: room


def test_range_parsing_says_what_is_wrong():
    assert parse_range("1:6") == (1, 6)
    for bad, needle in (("6", "MIN:MAX"), ("a:b", "MIN:MAX"), ("0:4", "1 <= MIN"), ("5:2", "MIN <= MAX"),
                        ("1:999", "MAX <= 256")):
        with pytest.raises(ValueError, match=needle):
            parse_range(bad)


def test_a_pool_grows_with_a_burst_and_retires_workers_after_it_without_losing_a_job(make_stack):
    s = make_stack(workers=0, autoscale_jobs_per_worker=4, autoscale_idle_s=2.0, autoscale_max_step=2)
    s.pool_args = ("--autoscale", "1:3")
    s.workers = 1
    s.start_pool()
    sizes, watching = [], threading.Event()

    def sample() -> None:  # the pool's size as Redis sees it (registered workers), all along
        while not watching.is_set():
            sizes.append(len(s.live_workers()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        jobs = [s.submit({"code": "import time\ntime.sleep(0.3)\nreturn input", "input": i}) for i in range(40)]
        docs = [s.wait_terminal(job_id, timeout_s=60) for job_id in jobs]
        wait_until(lambda: sizes[-1] == 1, 30, "the pool did not shrink back to MIN")
    finally:
        watching.set()
        sampler.join()
    assert max(sizes) == 3  # it reached MAX and never went past it
    assert [d["result"] for d in docs] == list(range(40))
    assert all(d["attempts"] == 1 for d in docs)  # nothing was cut short and retried
    assert len({d["worker"] for d in docs}) == 3
    wait_until(lambda: s.log("pool").count(" retired") == 2, 10, "the pool did not note both retirements")
    assert "lost with worker" not in s.log("pool")  # a retiring worker held no job when it went
    assert s.wait_terminal(s.submit({"code": "return 'still here'"}))["result"] == "still here"
