"""The worker's recorder and lease keeper (worker.py): threads around MongoDB writes, tested as
logic, with a stand-in for the lifecycle that records what it was asked and can fail on demand."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from sless_daemon.outcome import AttemptOutcome
from sless_daemon.worker import Finished, LeaseKeeper, Recorder


class Runner:
    """What the Recorder uses of an AttemptRunner: record(), lifecycle.store.drop_leases, leases."""

    def __init__(self, fail_drops: int = 0, fail_records: int = 0):
        self.recorded: list[str] = []
        self.dropped: list[list] = []
        self.fail_drops, self.fail_records = fail_drops, fail_records
        self.lock = threading.Lock()
        self.leases = SimpleNamespace(release=lambda job: None)
        self.lifecycle = SimpleNamespace(store=SimpleNamespace(drop_leases=self.drop_leases))

    def record(self, batch):
        with self.lock:
            if self.fail_records:
                self.fail_records -= 1
                raise RuntimeError("record refused")
            self.recorded += [f.job["_id"] for f in batch]
        return [SimpleNamespace(retry=False, recorded=True) for _ in batch]

    def drop_leases(self, attempts):
        with self.lock:
            if self.fail_drops:
                self.fail_drops -= 1
                raise RuntimeError("database is locked")  # not a DependencyDown: not retried by persist
            self.dropped.append(list(attempts))


def finished(n: int) -> Finished:
    return Finished({"_id": f"job{n}", "attempts": 1, "retries": 0}, AttemptOutcome(result=n), {}, {})


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_idle_worker_drops_its_settled_leases_at_once():
    runner = Runner()
    recorder = Recorder(runner)
    recorder.DROP_AFTER_S = 3600  # only the idle signal can drop them within this test
    for n in range(3):
        recorder.submit(finished(n))
    recorder.idle()
    assert wait_for(lambda: sum(map(len, runner.dropped)) == 3)
    assert runner.recorded == ["job0", "job1", "job2"]


def test_attempts_claimed_with_their_settle_have_no_lease_to_drop():
    runner = Runner()
    recorder = Recorder(runner)
    recorder.submit(finished(0))
    recorder.submit(Finished({"_id": "job1", "attempts": 1, "retries": 0}, AttemptOutcome(result=1), {}, {}, "run1"))
    recorder.drain()
    assert runner.recorded == ["job0", "job1"] and runner.dropped == [[("job0", 1)]]


def test_with_outcomes_always_waiting_leases_still_drop_when_due():
    """A backlog never lets the recorder's wait time out; the drop must come when due anyway."""
    runner = Runner()
    record = runner.record
    runner.record = lambda batch: (time.sleep(0.1), record(batch))[1]  # a slow MongoDB: a backlog builds
    recorder = Recorder(runner)
    for n in range(40):  # fewer than DROP_BATCH; `submit` blocks while MAX_PENDING wait
        recorder.submit(finished(n))
    recorder.drain()
    assert len(runner.recorded) == 40
    assert len(runner.dropped) >= 2 and len(runner.dropped[0]) < 40, [len(d) for d in runner.dropped]


def test_a_failed_drop_or_record_does_not_stop_the_recorder():
    runner = Runner(fail_drops=1, fail_records=1)
    recorder = Recorder(runner)
    recorder.submit(finished(0))  # its record fails (logged; its lease will expire and be recovered)
    recorder.drain()
    recorder.submit(finished(1))
    recorder.idle()  # the first drop fails
    time.sleep(0.1)
    recorder.submit(finished(2))
    recorder.idle()
    assert wait_for(lambda: any("job2" in str(drop) for drop in runner.dropped))
    assert runner.recorded == ["job1", "job2"]


def test_one_failing_renewal_does_not_stop_the_others():
    renewed: list[str] = []

    def renew(job):
        if job["_id"] == "bad":
            raise RuntimeError("update refused")
        renewed.append(job["_id"])

    keeper = LeaseKeeper(SimpleNamespace(settings=SimpleNamespace(lease_s=0.05), renew=renew))
    keeper.hold({"_id": "bad", "attempts": 1})
    keeper.hold({"_id": "good", "attempts": 1})
    assert wait_for(lambda: renewed.count("good") >= 3)
    keeper.release({"_id": "good", "attempts": 1})
    keeper.release({"_id": "bad", "attempts": 1})  # the keeper thread lives on: leave it nothing to do
    seen = len(renewed)
    time.sleep(0.1)
    assert len(renewed) == seen  # released: no longer renewed


def one_deferred(defer_max_s: float) -> tuple[Runner, Recorder]:
    """A recorder given one outcome while the worker starts its next job."""
    runner = Runner()
    recorder = Recorder(runner)
    recorder.DEFER_MAX_S = defer_max_s
    recorder.defer_writes()
    recorder.submit(finished(0))
    return runner, recorder


def test_an_outcome_deferred_while_the_next_job_starts_is_written_once_it_runs():
    runner, recorder = one_deferred(3600)  # only `write_now` can let it through within this test
    time.sleep(0.3)
    assert runner.recorded == []
    recorder.write_now()  # the next attempt has its request
    assert wait_for(lambda: runner.recorded == ["job0"])


def test_a_deferred_outcome_is_written_after_the_longest_deferral_without_a_word():
    """Whatever path forgets `write_now`, an outcome reaches MongoDB DEFER_MAX_S later."""
    runner, _ = one_deferred(1.0)
    time.sleep(0.2)
    assert runner.recorded == []  # deferred...
    assert wait_for(lambda: runner.recorded == ["job0"])  # ...not for ever


def test_a_stopping_worker_writes_what_it_deferred():
    runner, recorder = one_deferred(3600)
    draining = threading.Thread(target=recorder.drain, daemon=True)
    draining.start()
    draining.join(timeout=10)
    assert not draining.is_alive() and runner.recorded == ["job0"]
