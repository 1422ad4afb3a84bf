"""Runs one attempt of a job in a fresh sandbox, under limits, and reports what happened.

The worker calls `Executor.run`; user code only ever runs in the process started
here (the runner script inside bubblewrap, see sandbox.py), never in the worker.
The request goes in on stdin, the report comes back on its own pipe, stdout and
stderr are captured and capped (capture.py). Whatever the code does (hang, crash,
flood output, fork), the worker gets an AttemptOutcome back within the timeout plus
a small kill margin, and nothing of the attempt is left running.

Without a sandbox (`--insecure-no-sandbox`, trusted code only) the same runner runs
as a plain child process with the same rlimits.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .capture import Capture
from .cgroups import JobCgroup
from .limits import Limits, default_limits
from .outcome import AttemptOutcome, failed
from .sandbox import SANDBOX_ENV, Sandbox, drop_privileges, sandbox_command
from .seccomp_policy import bpf_fd
from .settings import Settings
from .spec import JobSpec
from .states import ErrorType

log = logging.getLogger(__name__)

RUNNER_PATH = Path(__file__).with_name("runner.py")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SANDBOX_OVERHEAD_PROCESSES = 4  # bubblewrap's two processes and some slack, under the slot's uid
REAP_TIMEOUT_S = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


def attempt_rlimits(limits: Limits, own_uid: bool) -> dict[int, tuple[int, int]]:
    """The rlimits of one attempt: memory, CPU seconds, processes, files, no core dumps.

    RLIMIT_NPROC counts every process of the user on the machine, so it is only set
    when the attempt runs under a uid of its own (`own_uid`).
    """
    memory = limits.memory_mb << 20
    cpu_s = math.ceil(limits.cpu_s)
    rlimits = {
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),  # SIGXCPU first, SIGKILL a second later
        resource.RLIMIT_NOFILE: (limits.open_files, limits.open_files),
        resource.RLIMIT_FSIZE: (limits.file_mb << 20, limits.file_mb << 20),
        resource.RLIMIT_CORE: (0, 0),
    }
    if own_uid:
        processes = limits.processes + SANDBOX_OVERHEAD_PROCESSES
        rlimits[resource.RLIMIT_NPROC] = (processes, processes)
    return rlimits


class Executor:
    """Starts attempts in fresh sandboxes (or, insecurely, plain processes)."""

    def __init__(self, settings: Settings, sandbox: Sandbox | None, name: str = "executor",
                 reap_orphans: bool = False):
        """`reap_orphans`: this process is a child subreaper with no children but attempts
        (a worker), so after each attempt it reaps whatever the attempt orphaned."""
        self.settings = settings
        self.sandbox = sandbox
        self.name = name
        self.reap_orphans = reap_orphans
        self.runner_source = RUNNER_PATH.read_bytes()
        self.attempt_numbers = itertools.count(1)
        self.spare: Launched | None = None
        self.default_spec = JobSpec(code="", input=None, limits=default_limits(settings), retries=0)

    def run(self, spec: JobSpec, context: dict | None = None) -> AttemptOutcome:
        """Run one attempt to its end and return its outcome; never raises for user faults.

        `context` (job_id, attempt, ...) reaches functions that take a second parameter.
        The attempt runs in the spare sandbox when one is ready with the job's limits.
        """
        request = json.dumps({"code": spec.code, "input": spec.input, "entry": spec.entry,
                              "context": context or {}}).encode()
        started = time.monotonic()
        launched = self._take_spare(spec) or self._launch(spec)
        reaped = False
        try:
            capture = Capture(spec.limits, self.settings.max_output_flood_bytes, launched.report_fd)  # closes it
            ended_by = capture.pump(launched.child, request, deadline=started + spec.timeout_s)
            status = _reap(launched.child)
            reaped = True
            breaches = _cgroup_breaches(launched.cgroup)  # read before the cgroup is removed
        finally:
            if not reaped:
                _reap(launched.child)
            self._dispose(launched)
        duration_s = time.monotonic() - started
        stderr = capture.stderr.text()
        error, result = classify(spec, self.settings, Ending(ended_by, status, duration_s, breaches),
                                 capture.report(), stderr)
        return AttemptOutcome(result, error, capture.stdout.text(), stderr, round(duration_s * 1000, 3))

    def prepare_spare(self) -> None:
        """Start the next sandbox now, with the default limits, so a job need not wait for it.

        A spare serves exactly one job and is never reused: it only moves bubblewrap's and
        the interpreter's start-up off the job's path (called while the worker is idle).
        """
        if self.sandbox is None or not self.settings.prewarm_sandbox or self.spare is not None:
            return
        try:
            self.spare = self._launch(self.default_spec)
        except OSError as e:
            log.warning("could not start a spare sandbox (%s); the next job starts its own", e)

    def close(self) -> None:
        """Stop the spare sandbox, if any (the worker is stopping)."""
        spare, self.spare = self.spare, None
        if spare:
            self.close_launched(spare)

    def _take_spare(self, spec: JobSpec) -> Launched | None:
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if spare.limits != spec.limits:
            # other limits: this job starts its own sandbox; the spare goes, so its processes
            # do not count against the job's process limit under the same slot uid
            self.close_launched(spare)
            return None
        if spare.child.poll() is not None:  # died while waiting
            self.close_launched(spare)
            return None
        return spare

    def close_launched(self, launched: Launched) -> None:
        os.close(launched.report_fd)
        _reap(launched.child)
        self._dispose(launched)

    def _launch(self, spec: JobSpec) -> Launched:
        """Start a process that will run one attempt with `spec`'s limits; it waits for its request."""
        cgroup = self._make_cgroup(spec)
        report_r, report_w = os.pipe()
        try:
            child, cleanup = self._start(spec, report_w, cgroup)
        except BaseException:
            os.close(report_r)
            if cgroup:
                cgroup.remove()
            raise
        finally:
            os.close(report_w)
        return Launched(child, report_r, cgroup, cleanup, spec.limits)

    def _dispose(self, launched: Launched) -> None:
        """Remove what an ended attempt leaves: its cgroup, temporary files, orphans."""
        launched.cleanup()
        if launched.cgroup:
            launched.cgroup.remove()
        if self.reap_orphans:
            reap_orphans()

    def _make_cgroup(self, spec: JobSpec) -> JobCgroup | None:
        if self.sandbox is None or self.sandbox.cgroups is None:
            return None
        name = f"{self.name}-{os.getpid()}-{next(self.attempt_numbers)}"
        return self.sandbox.cgroups.create(name, spec.memory_mb << 20,
                                           spec.limits.processes + SANDBOX_OVERHEAD_PROCESSES)

    def _start(self, spec: JobSpec, report_fd: int, cgroup: JobCgroup | None):
        """Start the attempt's process; returns it and a clean-up to call after it ended."""
        runner_args = [str(report_fd), str(spec.limits.result_bytes)]
        if self.sandbox is None:
            return _start_unsandboxed(spec, self.settings, report_fd, runner_args)
        runner_fd = _data_fd(self.runner_source)
        seccomp_fd = bpf_fd(self.sandbox.seccomp_bpf)
        info_r, info_w = os.pipe()
        command = sandbox_command(self.sandbox, runner_fd, seccomp_fd, spec.limits.tmpfs_mb << 20, runner_args,
                                  info_w)
        limits = attempt_rlimits(spec.limits, own_uid=self.sandbox.host_uid is not None)
        try:
            child = _spawn(command, (report_fd, runner_fd, seccomp_fd, info_w), "/", SANDBOX_ENV, limits,
                           cgroup, self.sandbox.host_uid)
        except BaseException:
            os.close(info_r)
            raise
        finally:
            os.close(runner_fd)
            os.close(seccomp_fd)
            os.close(info_w)
        return child, lambda: self._collect_init(info_r)

    def _collect_init(self, info_fd: int) -> None:
        """Collect the sandbox's init, orphaned to us when the outer bubblewrap died first."""
        try:
            os.set_blocking(info_fd, False)
            info = json.loads(os.read(info_fd, 4096) or b"{}")
        except (OSError, ValueError):
            info = {}
        finally:
            os.close(info_fd)
        pid = info.get("child-pid")
        if not (self.reap_orphans and isinstance(pid, int)):
            return
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return  # not ours (yet): someone else collects it
            time.sleep(0.001)


@dataclass
class Launched:
    """A started attempt process (maybe a spare still waiting for its request)."""

    child: subprocess.Popen
    report_fd: int
    cgroup: JobCgroup | None
    cleanup: Callable[[], None]
    limits: Limits


def _start_unsandboxed(spec: JobSpec, settings: Settings, report_fd: int, runner_args: list[str]):
    """The insecure path: the runner as a plain child in a temporary directory."""
    workdir = tempfile.mkdtemp(prefix="sless-attempt-")
    command = [sys.executable, "-I", "-S", "-B", str(RUNNER_PATH), *runner_args]
    env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
    try:
        child = _spawn(command, (report_fd,), workdir, env, attempt_rlimits(spec.limits, False), None, None)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return child, lambda: shutil.rmtree(workdir, ignore_errors=True)


def _data_fd(data: bytes) -> int:
    """A readable descriptor holding `data` (the runner's source, a few KiB)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


def _spawn(command, pass_fds, cwd, env, limits, cgroup: JobCgroup | None, uid: int | None):
    """Start the child in its own session: cgroup, rlimits, unprivileged uid, dies with us."""

    def prepare_child() -> None:  # runs in the child between fork and exec
        if cgroup:
            cgroup.join_self()
        for which, value in limits.items():
            resource.setrlimit(which, value)
        drop_privileges(uid)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid change, which clears it

    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
        cwd=cwd, env=env, start_new_session=True, preexec_fn=prepare_child,
    )


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


def _reap(child) -> int:
    """Kill what is left of the attempt (the outer bubblewrap; the namespace dies with it)
    and collect its exit status."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.error("cannot signal the sandbox (pid %d): the worker needs CAP_KILL", child.pid)
    try:
        return child.wait(timeout=REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.error("the sandbox (pid %d) did not die; leaving it", child.pid)
        return -signal.SIGKILL


def _cgroup_breaches(cgroup: JobCgroup | None) -> frozenset[str]:
    if cgroup is None:
        return frozenset()
    return frozenset(name for name, hit in (("memory", cgroup.memory_exhausted()),
                                            ("processes", cgroup.pids_exhausted())) if hit)


@dataclass(frozen=True)
class Ending:
    """How an attempt's process ended, as far as the worker can see."""

    ended_by: str  # "exited", "timeout" or "output_limit" (capture.Capture.pump)
    status: int  # exit code, -signal, or bubblewrap's 128 + signal
    duration_s: float
    breaches: frozenset[str]  # cgroup limits that were hit: "memory", "processes"


def classify(spec: JobSpec, settings: Settings, ending: Ending, report: str | None, stderr_text: str):
    """Decide (error, result) from how the attempt ended and what it reported."""
    ended_by = ending.ended_by
    if ended_by == "timeout":
        return failed(ErrorType.TIMEOUT, f"The attempt ran past its {spec.timeout_s:g} s time limit and was killed."), None
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


def _known_error(error: dict) -> dict:
    """Trust only the fields we expect from the runner's error report."""
    try:
        kind = ErrorType(error.get("type"))
    except ValueError:
        kind = ErrorType.CRASHED
    return failed(kind, str(error.get("message", ""))[:4000])
