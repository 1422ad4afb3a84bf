"""Runs one attempt of a job in a fresh sandbox, under limits, and reports what happened.

The worker calls `Executor.run`; user code only ever runs in a process forked for the
attempt by the worker's fork server (jobhost.py, runner.py) inside bubblewrap (see
sandbox.py), never in the worker. The request goes in on stdin, the report comes back
on its own pipe, stdout and stderr are captured and capped (capture.py). Whatever the
code does (hang, crash, flood output, fork), the worker gets an AttemptOutcome back
within the timeout plus a small kill margin, and nothing of the attempt is left
running: an attempt that does not end by itself takes the whole sandbox with it.

Without a sandbox (`--insecure-no-sandbox`, trusted code only) the same server runs
as a plain process and forks each attempt with the same rlimits.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

from .capture import EXIT_DRAIN_S, Capture, Watch
from .errors import SandboxUnavailable
from .jobhost import REAP_TIMEOUT_S, AttemptPipes, JobHost
from .limits import Limits, default_limits
from .outcome import AttemptOutcome, failed
from .sandbox import Sandbox
from .settings import Settings
from .spec import JobSpec
from .states import ErrorType

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
PROBE_CODE = "return 'sandbox-ok'"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Ordered:
    """An attempt the fork server was asked for: its pipes, limits and (insecure) directory."""

    host: JobHost
    pipes: AttemptPipes
    limits: Limits
    workdir: str | None
    ordered_at: float
    start_ms: float  # how long the fork server took to make it (a new server's start included)


class Executor:
    """Runs attempts, one at a time, through this worker's fork server.

    While the worker is idle (and right after each attempt) the next attempt's sandbox
    is ordered with the default limits: the fork server builds it and it waits for its
    request, so a job with those limits starts without waiting for the fork and the
    namespaces. It serves exactly one job; a job with other limits gets its own.
    """

    def __init__(self, settings: Settings, sandbox: Sandbox | None, name: str = "executor",
                 reap_orphans: bool = False):
        """`reap_orphans`: this process is a child subreaper with no children but its sandbox
        (a worker), so after each attempt it reaps whatever the sandbox orphaned."""
        self.settings = settings
        self.sandbox = sandbox
        self.name = name
        self.reap_orphans = reap_orphans
        self.host: JobHost | None = None
        self.spare: Ordered | None = None
        self.ended: Ordered | None = None  # its report came before its exit status (collect_ended)
        self.default_limits = default_limits(settings)

    def run(self, spec: JobSpec, context: dict | None = None, watch: Watch | None = None) -> AttemptOutcome:
        """Run one attempt to its end and return its outcome; never raises for user faults.

        `context` (job_id, attempt, ...) reaches functions that take a second parameter;
        `watch` (capture.Watch) sees the output as it comes and can cancel the attempt.
        """
        request = json.dumps({"code": spec.code, "input": spec.input, "entry": spec.entry,
                              "context": context or {}}).encode()
        started = time.monotonic()
        timings = {"sandbox_asked_at": time.time()}
        ordered = self._limited(spec.limits, watch)
        try:
            timings["sandbox_ready_at"] = time.time()
            capture = Capture(spec.limits, self.settings.max_output_flood_bytes)
            ended_by = capture.pump(ordered.pipes, ordered.host.control.fileno(), request,
                                    deadline=started + spec.timeout_s, watch=watch)
            report = capture.report()
            if ended_by == "exited" and report is not None:  # the report decides (classify): no status needed
                status, breaches = 0, frozenset()
                self.ended = ordered
            else:
                status, breaches = ordered.host.end()
        except BaseException:
            ordered.pipes.close()
            ordered.host.stop()  # its status is unread: it must not be taken for the next attempt's
            raise
        finally:
            if self.ended is not ordered:
                self._clean_up(ordered)
        duration_s = time.monotonic() - started
        stderr = capture.stderr.text()
        error, result = classify(spec, self.settings, Ending(ended_by, -signal.SIGKILL if status is None else status,
                                                             duration_s, breaches), report, stderr)
        timings.update(_code_times(report), sandbox_start_ms=ordered.start_ms)
        return AttemptOutcome(result, error, capture.stdout.text(), stderr, round(duration_s * 1000, 3), timings)

    def prepare(self) -> None:
        """Have a fork server running and, unless SLESS_PREWARM_SANDBOX=0, the next attempt's
        sandbox ordered, so the next job need not wait for either (at start and after each attempt).

        The spare is ordered without waiting for the attempt that just reported to end:
        the server makes it as soon as that one's processes are gone, while this worker
        takes its next message. That attempt's status is read when the spare is taken
        (`_take_spare`), or before, when the worker finds the queue empty (`collect_ended`).
        """
        if not self.settings.prewarm_sandbox:
            self.collect_ended()
            self._ready_host()
        elif self.spare is None:
            self.spare = self._order(self.default_limits)

    def probe(self) -> None:
        """Run one trivial attempt; SandboxUnavailable, with the reason, if it fails."""
        spec = JobSpec(code=PROBE_CODE, input=None, limits=self.default_limits, retries=0)
        outcome = self.run(spec)
        if outcome.result != "sandbox-ok":
            reason = (outcome.error or {}).get("message", "") + " " + outcome.stderr.strip()[-300:]
            raise SandboxUnavailable(f"an attempt cannot run in the sandbox: {reason.strip()}")

    def collect_ended(self) -> None:
        """Read the exit status of the attempt that sent its report before it ended: before
        any later status is read or the next attempt is sent its limits and request, and
        whenever the worker finds the queue empty (worker.AttemptRunner.idle).

        `run` returns its outcome without waiting (the report decides it); its processes
        are torn down meanwhile. The fork server sends the status once the attempt's whole
        process tree is gone and reads no order before, so nothing of one attempt is left
        when the next starts. One that does not end within EXIT_DRAIN_S of its report is
        killed with its sandbox (the spare ordered meanwhile with it), as when the report
        came last (capture.Capture.pump).
        """
        ended, self.ended = self.ended, None
        if ended is None:
            return
        try:
            ended.host.end(wait_s=EXIT_DRAIN_S)
        finally:
            self._clean_up(ended)

    def close(self) -> None:
        """Stop the fork server, if any (the worker is stopping)."""
        self.collect_ended()
        self._drop_spare()
        host, self.host = self.host, None
        if host:
            host.stop()

    def _limited(self, limits: Limits, watch: Watch | None) -> Ordered:
        """The attempt's sandbox (the spare, or one ordered now) with its cgroup limits set.

        A cgroup that refuses them (removed from under the worker) takes its fork server
        with it, and the attempt gets a new one (in a new cgroup), once.
        """
        for last_try in (False, True):
            ordered = self._take_spare(limits) or self._order(limits, watch)
            try:
                ordered.host.limit(limits)
                return ordered
            except BaseException as e:
                self._abandon(ordered)
                if last_try or not isinstance(e, OSError):
                    raise
                log.warning("the cgroup of %s's sandbox refused the attempt's limits (%s); starting a new one",
                            self.name, e)
        raise AssertionError("unreachable: the last try returns or raises")

    def _abandon(self, ordered: Ordered) -> None:
        """Give up an attempt before its request: its pipes closed, its whole sandbox killed."""
        ordered.pipes.close()
        ordered.host.stop()
        self._clean_up(ordered)

    def _take_spare(self, limits: Limits) -> Ordered | None:
        """The ordered spare if it fits these limits and its server still runs; else drop it.
        First the previous attempt's status, which the server sent before making the spare."""
        self.collect_ended()
        if self.spare is not None and self.spare.limits == limits and self.spare.host.alive:
            spare, self.spare = self.spare, None
            return spare
        self._drop_spare()
        return None

    def _drop_spare(self) -> None:
        """Cancel the spare: with its request pipe closed it exits; its status is read."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        spare.pipes.close()
        if spare.host.alive:
            spare.host.end(wait_s=REAP_TIMEOUT_S)
        self._clean_up(spare)

    def _clean_up(self, ordered: Ordered) -> None:
        if ordered.workdir:
            shutil.rmtree(ordered.workdir, ignore_errors=True)
        if self.reap_orphans:
            reap_orphans()

    def _ready_host(self, watch: Watch | None = None) -> JobHost:
        if self.host is not None and not self.host.alive:
            if not self.host.stopped:  # not by us (after an attempt that did not end by itself)
                log.warning("the sandbox of %s exited (code %s); starting a new one", self.name,
                            self.host.process.poll())
            self.close()
        if self.host is None:
            if watch is not None:
                watch.sandbox_starting()
            self.host = JobHost.start(self.settings, self.sandbox, self.name, reap_init=self.reap_orphans)
        return self.host

    def _order(self, limits: Limits, watch: Watch | None = None) -> Ordered:
        """Ask the fork server for an attempt's sandbox, starting a new server if the old one is gone
        (`watch`, if the attempt waits for it, is told first). Its cgroup limits are set when
        it is taken (`_limited`)."""
        workdir = tempfile.mkdtemp(prefix="sless-attempt-") if self.sandbox is None else None
        started = time.perf_counter()
        try:
            host = self._ready_host(watch)
            try:
                pipes = host.begin(limits, workdir)
            except OSError as e:
                log.warning("the sandbox of %s stopped taking attempts (%s); starting a new one", self.name, e)
                self.close()
                host = self._ready_host(watch)
                pipes = host.begin(limits, workdir)
        except BaseException:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return Ordered(host, pipes, limits, workdir, time.time(), round((time.perf_counter() - started) * 1000, 3))


def _code_times(report: str | None) -> dict:
    """When the user code started and ended, as the attempt reported it (epoch seconds)."""
    try:
        started, ended, made = json.loads(report)["times"]
        return {"sandbox_made_at": float(made), "code_started_at": float(started), "code_ended_at": float(ended)}
    except (TypeError, ValueError, KeyError, RecursionError):
        return {}


def become_subreaper() -> None:
    """Orphans of our attempts are re-parented to us (not to a PID 1 that may never reap them)."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans() -> None:
    """Collect every exited child; only for processes whose children are all attempts."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@dataclass(frozen=True)
class Ending:
    """How an attempt's process ended, as far as the worker can see."""

    ended_by: str  # "exited", "timeout", "output_limit" or "cancelled" (capture.Capture.pump)
    status: int  # exit code, -signal, or bubblewrap's 128 + signal
    duration_s: float
    breaches: frozenset[str]  # cgroup limits that were hit: "memory", "processes"


def classify(spec: JobSpec, settings: Settings, ending: Ending, report: str | None, stderr_text: str):
    """Decide (error, result) from how the attempt ended and what it reported."""
    ended_by = ending.ended_by
    if ended_by == "timeout":
        return failed(ErrorType.TIMEOUT, f"The attempt ran past its {spec.timeout_s:g} s time limit and was killed."), None
    if ended_by == "cancelled":
        return failed(ErrorType.CANCELLED, "Cancelled on request; the attempt's sandbox was killed."), None
    if ended_by == "output_limit":
        return failed(ErrorType.OUTPUT_LIMIT, f"The attempt wrote more than {settings.max_output_flood_bytes} bytes "
                                              "of output and was killed."), None
    if report is not None:
        return _from_report(report, spec)
    if "memory" in ending.breaches:
        return _out_of_memory(spec), None
    signum = _signal_of(ending.status)
    cpu_limit_s = math.ceil(spec.limits.cpu_s)
    # SIGXCPU is the soft CPU limit; SIGKILL a second later the hard one (for code that ignores
    # SIGXCPU). bubblewrap does not pass on its child's CPU usage, so elapsed time stands in.
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and ending.duration_s >= cpu_limit_s):
        return failed(ErrorType.TIMEOUT, f"The attempt used its {cpu_limit_s} s of CPU time and was killed."), None
    if "MemoryError" in stderr_text[-4096:] or "Cannot allocate memory" in stderr_text[-4096:]:
        return _out_of_memory(spec), None
    if "processes" in ending.breaches:
        return failed(ErrorType.PROCESS_LIMIT, f"The attempt reached its limit of {spec.limits.processes} "
                                               "processes and threads."), None
    how = f"was killed by {signal.Signals(signum).name}" if signum else f"exited with code {ending.status}"
    return failed(ErrorType.CRASHED, f"The attempt's process {how} before reporting a result."), None


def _from_report(report: str, spec: JobSpec):
    try:
        answer = json.loads(report)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and answer.get("ok") is True:
        return None, answer.get("result")
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = _known_error(answer["error"])
        return (_out_of_memory(spec) if error["type"] == ErrorType.MEMORY.value else error), None
    return failed(ErrorType.CRASHED, "The attempt sent back an unreadable report."), None


def _out_of_memory(spec: JobSpec) -> dict:
    return failed(ErrorType.MEMORY, f"The attempt ran out of its {spec.memory_mb} MiB memory limit.")


def _signal_of(status: int) -> int:
    """The signal that ended the process: negative status directly, or bubblewrap's 128+N."""
    if status < 0:
        return -status
    if 128 < status < 128 + 65:
        return status - 128
    return 0


# The error types runner.py reports. The report's descriptor is the job's own, so a job
# could write any report: it must not pass for a timeout, a lost worker or a cancel.
REPORTED_TYPES = frozenset({ErrorType.SYNTAX, ErrorType.ENTRY, ErrorType.MEMORY, ErrorType.EXCEPTION,
                            ErrorType.INVALID_RESULT, ErrorType.RESULT_LIMIT, ErrorType.OPEN_FILES_LIMIT,
                            ErrorType.FILE_SIZE_LIMIT, ErrorType.DISK_LIMIT, ErrorType.PROCESS_LIMIT})


def _known_error(error: dict) -> dict:
    """Trust only the fields we expect from the runner's error report, and only its types."""
    try:
        kind = ErrorType(error.get("type"))
    except ValueError:
        kind = ErrorType.CRASHED
    return failed(kind if kind in REPORTED_TYPES else ErrorType.CRASHED, str(error.get("message", ""))[:4000])
