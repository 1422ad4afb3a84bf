"""Group commit of submits (intake.py): pure logic with threads, then on the real daemon."""

from __future__ import annotations

import concurrent.futures
import threading
import time


from sless_daemon.errors import DependencyDown
from sless_daemon.intake import MAX_GROUP, GroupCommit


class SlowWriter:
    """A stand-in for Lifecycle.accept_many that takes a while, so requests pile up behind it."""

    def __init__(self, fail_on: int | None = None):
        self.groups: list[list[str]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, specs: list[str], stages: dict) -> list[dict]:
        time.sleep(0.02)
        with self.lock:
            self.groups.append(list(specs))
            if self.fail_on is not None and self.fail_on in specs:
                raise DependencyDown("Redis", "gone")
        stages["insert"] = 0.001
        return [{"_id": f"id-{spec}"} for spec in specs]


def submit_all(intake: GroupCommit, count: int) -> list:
    def one(n):
        stages = {}
        try:
            return intake.accept(n, stages), stages
        except DependencyDown as e:
            return e, stages

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_a_lone_request_is_written_at_once_in_a_group_of_one():
    writer = SlowWriter()
    assert GroupCommit(writer).accept(7, {}) == {"_id": "id-7"}
    assert writer.groups == [[7]]


def test_overlapping_requests_share_groups_and_each_gets_its_own_job():
    writer = SlowWriter()
    answers = submit_all(GroupCommit(writer), 40)
    assert [job for job, _ in answers] == [{"_id": f"id-{n}"} for n in range(40)]
    assert all(stages == {"insert": 0.001} for _, stages in answers)  # followers get their group's stages
    written = [spec for group in writer.groups for spec in group]
    assert sorted(written) == list(range(40))  # every request written exactly once
    assert len(writer.groups) < 40 and max(len(group) for group in writer.groups) > 1
    assert max(len(group) for group in writer.groups) <= MAX_GROUP


def test_a_failed_group_fails_every_request_in_it_and_no_other():
    writer = SlowWriter(fail_on=0)
    answers = submit_all(GroupCommit(writer), 20)
    failed_group = next(group for group in writer.groups if 0 in group)
    for n, (answer, _) in enumerate(answers):
        if n in failed_group:
            assert isinstance(answer, DependencyDown)
        else:
            assert answer == {"_id": f"id-{n}"}


def test_concurrent_submits_are_each_recorded_enqueued_and_run(make_stack):
    """Given 48 submits at once (grouped by the daemon), each gets its own id, its own record,
    its own message, and its own result."""
    stack = make_stack(workers=0)
    redis = stack.redis()
    before = redis.llen(f"rq:queue:{stack.queue_name}")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda n: stack.submit({"code": "return input * 2", "input": n}), range(48)))
    assert len(set(ids)) == 48
    assert stack.mongo_jobs().count_documents({"_id": {"$in": ids}}) == 48
    assert redis.llen(f"rq:queue:{stack.queue_name}") == before + 48
    stack.workers = 1
    stack.start_pool()
    results = [stack.wait_terminal(job_id, timeout_s=60)["result"] for job_id in ids]
    assert results == [n * 2 for n in range(48)]
