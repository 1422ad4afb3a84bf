"""One worker process: takes attempts from the RQ queue and runs each one via the executor.

The consumer (consumer.py) hands it every message. The worker never runs user code
itself: it claims the attempt in MongoDB, asks the executor for an outcome, and
records it through the lifecycle. Started by the worker pool (see WORKER_ENTRY
there) with `--name NAME`; settings come from `SLESS_*` variables.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .capture import Watch
from .consumer import Consumer
from .errors import DependencyDown
from .errors import SandboxUnavailable
from .executor import Executor, become_subreaper
from .feed import OutputFeed, state_entry
from .lifecycle import Lifecycle
from .limits import from_document
from .logs import configure_logging, summarize
from .outcome import AttemptOutcome, failed
from .queue import JobQueue, connect_redis
from .sandbox import Sandbox, build_sandbox
from .settings import Settings
from .spec import JobSpec
from .states import ErrorType, JobState
from .store import OutcomeStore, connect_mongo

log = logging.getLogger("sless.worker")


SANDBOX_UNAVAILABLE_EXIT = 78  # EX_CONFIG: the pool stops instead of respawning forever
WRITE_RETRY_FIRST_S = 0.5
WRITE_RETRY_MAX_S = 10.0
CANCEL_CHECK_BACKOFF_S = 30.0
WITH_SETTLE = "with settle"  # a quiet attempt that ended within the hold: its claim goes in with its settle


def run_job(message: dict) -> None:
    """The function RQ messages name (queue.RUN_JOB). sless workers never call it: their
    consumer hands each message to the attempt runner (consumer.py). Here only so that a
    plain `rq worker` pointed at the queue fails clearly instead of running user code."""
    raise RuntimeError("sless messages are run by `sless worker`, which sandboxes them; not by `rq worker`")


def spec_from_job(job: dict) -> JobSpec:
    """Rebuild the accepted spec from its stored document."""
    return JobSpec(code=job["code"], input=json.loads(job["input_json"]), limits=from_document(job["limits"]),
                   retries=job["retries"], entry=job.get("entry"), input_json=job["input_json"])


class AttemptRunner:
    """Claims, executes and records one attempt at a time.

    The claim is written from a thread of its own while the attempt already runs, off
    the path from message to outcome. That is safe because nothing an attempt does is
    seen outside its sandbox (no network, a private filesystem, nothing shared with the
    next attempt) until this worker publishes it, and the worker publishes nothing of it
    (output, "running", outcome) before its claim stands. An attempt whose claim fails
    (a duplicate message, a cancel that fenced it first, or MongoDB refusing) is stopped
    at its next check (AttemptWatch.CANCEL_CHECK_S) and its outcome discarded, as if it had
    never run.

    Most attempts are short, so a sandboxed attempt's claim is held back for up to
    `claim_hold_s` (Claim). One that ends within it and wrote nothing has no lease: its claim
    goes into MongoDB with its settle, in one ordered insert that stops at a claim taken
    before (store.settle_many), and its message is marked finished only once that is
    written, so a worker that dies first leaves it to the recovery sweep, as a message
    taken and never claimed. Such a job costs MongoDB one write instead of three (the
    lease, the claim, the settle; and the lease's delete) and its outcome waits for no
    other, nor any thread. An attempt that runs on, has output to publish, or waits for a
    fork server to start gets its lease, then its claim event, from the claimer thread.
    Without a sandbox (`--insecure-no-sandbox`) code can reach the world, so there the
    claim is written first.
    """

    def __init__(self, lifecycle: Lifecycle, executor: Executor, worker_name: str):
        self.lifecycle = lifecycle
        self.executor = executor
        self.worker_name = worker_name
        self.leases = LeaseKeeper(lifecycle)
        self.recorder = Recorder(self)
        self.claims = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="claim")

    def run(self, message: dict, queued: int = 0) -> bool:
        """Run the attempt a message carries (`queued`: messages waiting behind it). True: the
        consumer may mark the message finished now; False: the recorder does, once the claim
        and settle are written."""
        timings = {"enqueued_at": message.get("enqueued_at"), "dequeued_at": time.time()}
        job = self.lifecycle.attempt_of(message)
        fields = {"job_id": job["_id"], "attempt": job["attempts"], "worker": self.worker_name}
        try:
            spec = spec_from_job(job)
        except Exception as e:  # noqa: BLE001 - a message this worker cannot read fails its attempt, once
            self.recorder.write_now()  # no request follows to let the last outcome through
            self.fail_unreadable(job, e, timings, fields)
            return True
        claim_first = self.executor.sandbox is None  # no sandbox (--insecure): the code could reach the world
        hold_s = 0.0 if claim_first else self.lifecycle.settings.claim_hold_s
        claim = Claim(self, job, spec, timings, fields)
        if not hold_s:
            claim.start()
        if claim_first and not claim.future.result():  # started just above
            self.recorder.write_now()  # no request follows to let the last outcome through
            log_duplicate(job, fields)
            return True
        context = {"job_id": job["_id"], "attempt": job["attempts"], "max_attempts": spec.max_attempts,
                   "timeout_s": spec.timeout_s}
        watch = AttemptWatch(self.lifecycle, job["_id"], job["attempts"], self.worker_name, claim, self.recorder,
                             hold_s)
        outcome = self.execute(spec, context, watch)
        try:
            # Never started: a quiet attempt that ended within the hold. Its claim goes in with its settle.
            # MongoDB refusing the claim raises: the consumer leaves the message to the sweep.
            claimed = WITH_SETTLE if watch.ended_quiet_within_hold() else claim.start().result()
            if not claimed:
                log_duplicate(job, fields)
                return True
            run = uuid.uuid4().hex if claimed is WITH_SETTLE else None  # tells this run's claim from another's
            if run:
                log_started(job, spec, fields)  # it ran; its claim goes in with its outcome
            try:
                watch.done()  # what it held back while the claim was being written
            finally:
                if queued:
                    self.recorder.defer_writes()  # the next job is started first (Recorder)
                self.recorder.submit(Finished(job, outcome, timings, fields, run))  # always: it holds a lease or its message
            return run is None
        finally:
            self.executor.prepare()

    def idle(self) -> None:
        """The queue is empty: end what the last attempt left (its exit status is read here, not
        when the next job comes, so an attempt that reported and runs on is killed within
        capture.EXIT_DRAIN_S however long the queue stays empty), write what the recorder
        deferred, and drop settled leases."""
        self.recorder.write_now()
        try:
            self.executor.collect_ended()
        except Exception:  # noqa: BLE001 - the worker goes on; a broken fork server is replaced at the next job
            log.exception("the sandbox of %s could not be checked after its last attempt", self.worker_name)
        self.recorder.idle()

    def claim(self, job: dict, spec: JobSpec, timings: dict, fields: dict) -> bool:
        """Claim the attempt (in the claimer thread): its lease and claim event, then renew the lease."""
        if not self.lifecycle.claim(job):
            return False
        timings["claimed_at"] = time.time()
        log_started(job, spec, fields)
        self.leases.hold(job)
        return True

    def fail_unreadable(self, job: dict, error: Exception, timings: dict, fields: dict) -> None:
        """A message whose job this worker cannot read (a field missing or malformed): its
        attempt is claimed and failed as crashed, so the job's retries count down instead of
        the orphan check sending the unclaimed message again and again."""
        log.error("job %s: attempt %d cannot be read (%s: %s); it fails", job["_id"], job["attempts"],
                  type(error).__name__, error, extra=fields)
        if not self.lifecycle.claim(job):
            log_duplicate(job, fields)
            return
        self.leases.hold(job)
        why = failed(ErrorType.CRASHED, f"The job's message could not be read: {type(error).__name__}: {error}")
        self.recorder.submit(Finished(job, AttemptOutcome(error=why), timings, fields))

    def execute(self, spec: JobSpec, context: dict, watch: Watch) -> AttemptOutcome:
        """Run the attempt; a fault of the executor itself fails the attempt, not the worker."""
        try:
            return self.executor.run(spec, context, watch)
        except Exception as e:  # noqa: BLE001 - a poison job must never stop the worker loop
            self.recorder.write_now()  # its request may never have gone
            log.exception("job %s: the executor failed", context["job_id"], extra={"job_id": context["job_id"]})
            return AttemptOutcome(error=failed(ErrorType.CRASHED, f"The executor failed: {type(e).__name__}: {e}"))

    def record(self, finished: list[Finished]):
        """Write outcomes, retrying while MongoDB is away: a finished attempt is never dropped.
        Their leases stay (see Recorder) and are no longer renewed."""
        return persist(lambda: self.lifecycle.finish_many([(f.job, f.outcome, f.timings) for f in finished],
                                                          drop_leases=False, claims=[f.claim_run for f in finished]),
                       f"record {len(finished)} outcomes")


def persist(write, what: str):
    """Call `write` until MongoDB takes it, waiting longer after each refusal."""
    delay = WRITE_RETRY_FIRST_S
    while True:
        try:
            return write()
        except DependencyDown as e:
            log.warning("cannot %s yet (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_S)


@dataclass
class Finished:
    """An attempt that ended, waiting for its outcome to be written."""

    job: dict
    outcome: AttemptOutcome
    timings: dict
    fields: dict
    claim_run: str | None = None  # it has no lease: its claim, naming this run, goes in with its settle


class Claim:
    """One attempt's claim, written by the claimer thread once started (see AttemptRunner).

    A sandboxed attempt's claim is held back: it starts once the attempt has run
    `claim_hold_s` or written something (AttemptWatch). One that ends quiet before that
    never starts it, so its claim costs no thread hand-off: it goes in with its settle.
    """

    def __init__(self, runner: AttemptRunner, job: dict, spec: JobSpec, timings: dict, fields: dict):
        self.runner = runner
        self.args = (job, spec, timings, fields)
        self.future: concurrent.futures.Future | None = None

    @property
    def started(self) -> bool:
        return self.future is not None

    def start(self) -> concurrent.futures.Future:
        """Have the claimer write the claim (once); its future says whether it stands."""
        if self.future is None:
            self.future = self.runner.claims.submit(self.runner.claim, *self.args)
        return self.future

    def stands(self) -> bool:
        future = self.future
        return future is not None and future.done() and future.exception() is None and future.result() is True

    def refused(self) -> bool:
        """Written and lost (taken before), or not written (MongoDB refused): this run is discarded."""
        return self.future is not None and self.future.done() and not self.stands()


class Recorder:
    """Writes finished attempts' outcomes from a thread of its own, while the worker takes its
    next job: the write is off the path from one job to the next.

    While messages wait behind an attempt (a drain), its outcome is written once the next
    attempt has its request (`defer_writes` as one ends; `write_now` at the next one's request,
    when a message leads to no request, when the queue is found empty, or as the worker stops;
    DEFER_MAX_S at most in any case): the worker's own path to the next job (reading the
    report, `TAKE`, the spare's limits, the request) and the fork server's (the ended
    attempt's exit, the next sandbox) then share the two cores with neither the write (the
    interpreter lock, BSON, FerretDB's insert and commit) nor the announcement's pipeline.
    Measured (BENCHMARKS.md, session 14, step 29): from one `cpu10` job's code to the next's
    2.53-2.82 ms without, 2.01-2.44 with. An attempt with no message queued behind it does
    not defer its outcome.

    An attempt keeps its lease, renewed, until its outcome is written. If the worker
    dies with outcomes unwritten, the recovery sweep settles those attempts as lost and
    they are retried, as if it had died while running them; one without a lease (its
    claim goes in with its settle) keeps its message taken until then, and the sweep
    sends that message again. At most MAX_PENDING wait; `drain` waits for all of them
    (the worker is stopping).

    Settled attempts' leases are dropped together: once the worker finds the queue empty
    (`idle`), or DROP_AFTER_S after the first of them settled, or once DROP_BATCH wait. A
    delete costs FerretDB a scan of `leases` and a commit, as much as the settle itself
    (BENCHMARKS.md, session 4, step 10). A lease left behind a settle event is inert: readers go by
    the settle event (store.derive), nobody renews it, and if this worker dies before
    dropping it, the sweep finds the attempt settled and only drops it (Lifecycle.lose).
    """

    MAX_PENDING = 4
    DEFER_MAX_S = 0.05  # an outcome deferred for the next job's start is written after this anyway
    DROP_AFTER_S = 0.5
    DROP_BATCH = 64
    DROP_NOW = None  # queued by `idle`: drop what is settled once what finished before it is written

    def __init__(self, runner: AttemptRunner):
        self.runner = runner
        self.pending: queue.Queue[Finished | None] = queue.Queue(maxsize=self.MAX_PENDING + 1)
        self.settled: list[tuple[str, int]] = []  # leases to drop
        self.drop_at = float("inf")
        self.lock = threading.Lock()  # over `settled`
        self.dropping = threading.Lock()  # one drop at a time: the recorder's, or `drain`'s last
        self.may_write = threading.Event()  # clear while the worker starts its next job (defer_writes)
        self.may_write.set()
        threading.Thread(target=self.loop, name="recorder", daemon=True).start()

    def defer_writes(self) -> None:
        """The worker is starting its next job: write nothing until `write_now` (or DEFER_MAX_S)."""
        self.may_write.clear()

    def write_now(self) -> None:
        """The next job runs (or none will start soon): write what waits."""
        self.may_write.set()

    def submit(self, finished: Finished) -> None:
        self.pending.put(finished)  # blocks while MAX_PENDING wait: MongoDB sets the pace

    def idle(self) -> None:
        """The worker found no message: drop the settled attempts' leases once what is queued is written."""
        if self.settled or not self.pending.empty():
            try:
                self.pending.put_nowait(self.DROP_NOW)
            except queue.Full:
                pass  # outcomes are queued; the worker asks again when it next finds the queue empty

    def drain(self) -> None:
        """Wait until every outcome is written; then try once to drop the leases left."""
        self.write_now()
        self.pending.join()
        try:
            self.drop_settled_leases(retry=False)
        except Exception as e:  # noqa: BLE001 - optional: the sweep drops leases behind settle events
            log.warning("could not drop %d settled leases before stopping (%s)", len(self.settled), e)

    def loop(self) -> None:
        while True:
            try:
                items = [self.pending.get(timeout=self.wait_s())]
            except queue.Empty:
                items = []  # the settled leases are due
            if items:
                self.may_write.wait(self.DEFER_MAX_S)
            while items and len(items) <= self.MAX_PENDING:  # whatever else finished meanwhile: one insert
                try:
                    items.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            batch = [item for item in items if item is not self.DROP_NOW]
            try:
                if batch:
                    self.write(batch)
                if not items or len(batch) < len(items) or self.drop_due():
                    self.drop_settled_leases()
            except Exception:  # noqa: BLE001 - leases expire, messages stay taken: the sweep recovers them
                log.exception("the recorder failed on %d outcomes; it goes on with the next", len(batch))
            finally:
                for _ in items:
                    self.pending.task_done()

    def write(self, batch: list[Finished]) -> None:
        """Write these outcomes in one insert; their leases are no longer renewed."""
        try:
            for finished, decision in zip(batch, self.runner.record(batch)):
                if decision.recorded:
                    log_outcome(finished.job, finished.outcome, decision, finished.fields)
            leased = [(f.job["_id"], f.job["attempts"]) for f in batch if not f.claim_run]
            if leased:
                with self.lock:
                    self.settled.extend(leased)
                    self.drop_at = min(self.drop_at, time.monotonic() + self.DROP_AFTER_S)
        finally:
            for finished in batch:
                self.runner.leases.release(finished.job)

    def drop_due(self) -> bool:
        with self.lock:
            return len(self.settled) >= self.DROP_BATCH or time.monotonic() >= self.drop_at

    def wait_s(self) -> float | None:
        """How long the recorder may wait for the next outcome before leases are due to drop."""
        with self.lock:
            return None if not self.settled else max(0.0, self.drop_at - time.monotonic())

    def drop_settled_leases(self, retry: bool = True) -> None:
        with self.dropping:
            with self.lock:
                settled, self.settled, self.drop_at = self.settled, [], float("inf")
            if not settled:
                return
            drop = lambda: self.runner.lifecycle.store.drop_leases(settled)  # noqa: E731
            persist(drop, f"drop {len(settled)} leases") if retry else drop()


class AttemptWatch(Watch):
    """Tells the job's feed that the attempt runs and what it writes; asks Redis, every
    `CANCEL_CHECK_S` once the attempt has run that long, whether it was cancelled.

    Nothing is told before the attempt's claim stands (`claim`, see AttemptRunner): until
    then output is held, and a failed claim stops the attempt. A held-back claim is
    started here, at the first output or once the hold is over: until then the capture
    loop wakes at least every `claim_hold_s` (`interval_s`). The "running" entry goes
    out with the first output or at the first cancel check, so a job of a few
    milliseconds that prints nothing costs no Redis call here at all (its end is
    announced with the settle). Redis being away never stops the attempt: its feed is
    incomplete and a cancel waits. Once the attempt has its whole request, it lets the recorder
    write the outcome of the attempt before (Recorder.defer_writes).
    """

    CANCEL_CHECK_S = 0.25

    def __init__(self, lifecycle: Lifecycle, job_id: str, attempt: int, worker: str, claim: Claim,
                 recorder: Recorder, hold_s: float = 0.0):
        self.queue = lifecycle.queue
        self.feed = lifecycle.feed
        self.job_id = job_id
        self.attempt = attempt
        self.worker = worker
        self.claim = claim
        self.recorder = recorder
        self.output_feed = OutputFeed(lifecycle.feed, job_id, attempt)
        now = time.monotonic()
        self.hold_until = now + hold_s
        self.interval_s = hold_s if hold_s and not claim.started else self.CANCEL_CHECK_S  # the capture loop's wake-ups
        self.next_check = now + self.CANCEL_CHECK_S
        self.told = False
        self.wrote = False

    def claimed(self) -> bool:
        """Whether the claim stands (not one that goes in with the settle: that attempt has ended)."""
        return self.claim.stands()

    def start_claim(self) -> None:
        self.claim.start()
        self.interval_s = self.CANCEL_CHECK_S

    def ended_quiet_within_hold(self) -> bool:
        """Whether the attempt ended within the hold, its claim not started, having written nothing, so
        nothing waits to be published and its claim may go in with its settle. Bounded by the hold,
        whatever delayed the capture loop: the sweep sends again a message taken a lease ago, unclaimed."""
        return not self.claim.started and not self.wrote and time.monotonic() <= self.hold_until

    def sandbox_starting(self) -> None:
        self.start_claim()  # a held claim does not wait for a fork server's start

    def output(self, stream: str, data: bytes) -> None:
        self.wrote = True
        self.output_feed.add(stream, data)
        if not self.claim.started:
            self.start_claim()  # what it wrote goes out once the claim stands
        elif self.claimed():
            self.publish()

    def request_sent(self) -> None:
        self.recorder.write_now()  # this attempt runs: the outcome of the one before may be written

    def cancelled(self) -> bool:
        if not self.claim.started:
            if time.monotonic() < self.hold_until:
                return False
            self.start_claim()  # it runs on: claimed now, with a lease
        if not self.claimed():
            return self.claim.refused()  # taken before, or not written: this run will be discarded
        self.publish()  # what a quiet job wrote last still goes out within a flush period
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.tell_running()
        self.next_check = now + self.CANCEL_CHECK_S
        try:
            return self.queue.cancel_requested(self.job_id, self.attempt)
        except DependencyDown:
            self.next_check = time.monotonic() + CANCEL_CHECK_BACKOFF_S  # a hung Redis must not slow the job
            return False

    def done(self) -> None:
        """Publish what is left once the claim stands (called at the pipes' end, and again
        by the runner after the claim, for an attempt that ended before it)."""
        if self.claimed():
            self.publish(final=True)

    def publish(self, final: bool = False) -> None:
        """Flush the output feed, "running" first once the attempt wrote anything."""
        if self.wrote:
            self.tell_running()
        self.output_feed.flush(final)

    def tell_running(self) -> None:
        """Put "running" in the job's feed, once, before anything else of this attempt."""
        if self.told:
            return
        self.told = True
        try:
            self.feed.publish(self.job_id, state_entry(self.attempt, JobState.RUNNING.value, self.worker))
        except DependencyDown as e:
            log.warning("job %s: cannot tell its feed it started (%s)", self.job_id, e, extra={"job_id": self.job_id})


class LeaseKeeper:
    """Renews the leases of this worker's running attempts from one thread, every fifth of a
    lease, until their outcomes are written (the heartbeat).

    If this worker dies, nobody renews them and a recovery sweep on any host settles
    those attempts as lost within about one lease.
    """

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        self.held: dict[tuple[str, int], dict] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self.beat, name="leases", daemon=True).start()

    def hold(self, job: dict) -> None:
        with self.lock:
            self.held[job["_id"], job["attempts"]] = job

    def release(self, job: dict) -> None:
        with self.lock:
            self.held.pop((job["_id"], job["attempts"]), None)

    def beat(self) -> None:
        while True:
            time.sleep(self.lifecycle.settings.lease_s / 5)
            with self.lock:
                jobs = list(self.held.values())
            for job in jobs:
                try:
                    self.lifecycle.renew(job)
                except Exception as e:  # noqa: BLE001 - one failed renewal must not end the others'
                    log.warning("job %s: cannot renew the lease (%s)", job["_id"], e)


def log_started(job: dict, spec: JobSpec, fields: dict) -> None:
    log.info("job %s started, attempt %d/%d, input %s", job["_id"], job["attempts"], spec.max_attempts,
             summarize(spec.input), extra=fields)


def log_duplicate(job: dict, fields: dict) -> None:
    log.info("job %s: attempt %d was taken before (a duplicate message); its run here, if any, is discarded",
             job["_id"], job["attempts"], extra=fields)


def log_outcome(job: dict, outcome: AttemptOutcome, decision, fields: dict) -> None:
    """One readable line per attempt's end: completed, timed out, failed, retry scheduled."""
    job_id = job["_id"]
    context = {**fields, "duration_ms": outcome.duration_ms}
    if outcome.ok:
        log.info("job %s completed in %.1f ms, result %s", job_id, outcome.duration_ms, summarize(outcome.result),
                 extra={**context, "state": "completed"})
        return
    kind, message = outcome.error["type"], outcome.error["message"]
    context["error_type"] = kind
    what = "timed out" if kind == ErrorType.TIMEOUT.value else f"failed ({kind})"
    if decision.retry:
        log.warning("job %s %s: %s. Retry %d/%d scheduled in %.1f s.", job_id, what, message.rstrip("."),
                    job["attempts"] + 1, job["retries"] + 1, decision.delay_s, extra={**context, "state": "submitted"})
    else:
        log.error("job %s %s: %s. No retries left.", job_id, what, message.rstrip("."),
                  extra={**context, "state": "failed"})


def build_runner(settings: Settings, name: str, redis_connection, sandbox: Sandbox | None) -> AttemptRunner:
    """Wire the attempt runner from its parts."""
    store = OutcomeStore(connect_mongo(settings.mongo_url), settings.mongo_db)
    lifecycle = Lifecycle(settings, store, JobQueue(redis_connection, settings.queue_name), owner=name)
    return AttemptRunner(lifecycle, Executor(settings, sandbox, name, reap_orphans=True), name)


def prepare_sandbox(settings: Settings, slot: int, insecure: bool) -> Sandbox | None:
    """The sandbox every attempt will use, proven to start; None only when explicitly insecure."""
    if insecure:
        log.warning("INSECURE: --insecure-no-sandbox given: user code runs as plain processes on this host, "
                    "with rlimits only. Never do this with code you do not trust.")
        return None
    sandbox = build_sandbox(settings.sandbox_python, settings.sandbox_uid_base, slot)
    if sandbox.cgroups:
        sandbox.cgroups.remove_stale(prefix=socket.gethostname() + ".")
    log.info("sandbox ready: bubblewrap %s, python %s, host uid %s, cgroups %s", sandbox.bwrap, sandbox.python,
             sandbox.host_uid if sandbox.host_uid is not None else "(own)",
             f"v{sandbox.cgroups.version}" if sandbox.cgroups else "unavailable (rlimits only)")
    return sandbox


def serve(settings: Settings, name: str, slot: int = 0, insecure: bool = False) -> None:
    """Consume the queue until told to stop (SIGTERM/SIGINT: finish the running job first)."""
    configure_logging(settings.log_format, settings.log_level, name)
    become_subreaper()
    sandbox = prepare_sandbox(settings, slot, insecure)
    connection = connect_redis(settings.redis_url)
    runner = build_runner(settings, name, connection, sandbox)
    runner.executor.probe()
    runner.executor.prepare()
    consumer = Consumer(JobQueue(connection, settings.queue_name), name, runner.run, idle=runner.idle)
    gc.collect()
    gc.freeze()  # see daemon.make_wsgi_app: a full collection here took 13-15 ms, every few seconds
    log.info("worker %s consuming queue %s", name, settings.queue_name, extra={"worker": name})
    try:
        consumer.work()
    finally:
        runner.recorder.drain()
        runner.executor.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one sless worker process.")
    parser.add_argument("--name", required=True, help="unique worker name (the pool assigns it)")
    parser.add_argument("--slot", type=int, default=0, help="the pool slot: picks the sandbox's host uid")
    parser.add_argument("--insecure-no-sandbox", action="store_true", help="run user code without a sandbox")
    args = parser.parse_args(argv)
    try:
        serve(Settings.from_env(), args.name, args.slot, args.insecure_no_sandbox)
    except SandboxUnavailable as e:
        log.critical("worker %s refuses to start: %s", args.name, e)
        raise SystemExit(SANDBOX_UNAVAILABLE_EXIT) from None

