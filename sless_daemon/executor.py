"""Runs one attempt of a job in a fresh OS process, under limits, and reports what happened.

The worker calls `Executor.run`; user code only ever runs in the child started here
(the runner script), never in the worker. The child gets the request on stdin and
reports on its own pipe; its stdout and stderr are captured and capped. Whatever the
child does (hang, crash, flood output, fork), the worker gets an AttemptOutcome back
within the timeout plus a small kill margin.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import Settings
from .spec import JobSpec
from .states import ErrorType

log = logging.getLogger(__name__)

RUNNER_PATH = Path(__file__).with_name("runner.py")
READ_CHUNK_BYTES = 64 << 10
REPORT_SLACK_BYTES = 4096  # room for the report's envelope around the result
EXIT_DRAIN_S = 0.2  # after the child exits, how long to wait for descendants' last output
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt produced: a result or an error, plus captured output and time taken."""

    result: Any = None
    error: dict | None = None  # {"type": ErrorType value, "message": str}
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_type(self) -> ErrorType | None:
        return ErrorType(self.error["type"]) if self.error else None


def failed(kind: ErrorType, message: str) -> dict:
    """An error document as stored and shown: {"type", "message"}."""
    return {"type": kind.value, "message": message}


class CappedBuffer:
    """Keeps the first `limit` bytes of a stream and notes how much was cut."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        text = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[sless: output truncated; {self.dropped} more bytes were dropped]\n"
        return text


def attempt_rlimits(spec: JobSpec, settings: Settings) -> dict[int, tuple[int, int]]:
    """The rlimits of one attempt's process: memory, CPU seconds, files, no core dumps."""
    memory = spec.memory_mb << 20
    cpu_s = math.ceil(spec.timeout_s) + 1  # the wall clock normally fires first
    return {
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_NOFILE: (settings.max_open_files, settings.max_open_files),
        resource.RLIMIT_FSIZE: (settings.max_file_mb << 20, settings.max_file_mb << 20),
        resource.RLIMIT_CORE: (0, 0),
    }


def runner_command(settings: Settings, report_fd: int) -> list[str]:
    """The interpreter command line of the runner: isolated mode, no site-packages."""
    return [sys.executable, "-I", "-S", "-B", str(RUNNER_PATH), str(report_fd), str(settings.max_result_bytes)]


def scrubbed_env(home: str) -> dict[str, str]:
    """The whole environment user code sees: nothing from the worker leaks in."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


class Executor:
    """Starts attempts in fresh processes with the limits the settings allow."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def run(self, spec: JobSpec, context: dict | None = None) -> AttemptOutcome:
        """Run one attempt to its end and return its outcome; never raises for user faults.

        `context` (job_id, attempt, ...) reaches functions that take a second parameter.
        """
        workdir = tempfile.mkdtemp(prefix="sless-attempt-")
        try:
            return self._run_in(spec, context or {}, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(self, spec: JobSpec, context: dict, workdir: str) -> AttemptOutcome:
        report_r, report_w = os.pipe()
        request = json.dumps({"code": spec.code, "input": spec.input, "entry": spec.entry, "context": context}).encode()
        limits = attempt_rlimits(spec, self.settings)
        started = time.monotonic()
        try:
            child = _spawn(runner_command(self.settings, report_w), limits, workdir, report_w)
        finally:
            os.close(report_w)
        capture = _Capture(self.settings, report_r)
        timed_out = capture.pump(child, request, deadline=started + spec.timeout_s)
        status, usage = _reap(child)
        duration_ms = (time.monotonic() - started) * 1000
        stderr = capture.stderr.text()
        error, result = classify(spec, timed_out, status, usage, capture.report(), stderr)
        return AttemptOutcome(result, error, capture.stdout.text(), stderr, round(duration_ms, 3))


def classify(spec, timed_out, status, usage, report, stderr_text):
    """Decide (error, result) from how the child ended and what it reported."""
    if timed_out:
        return failed(ErrorType.TIMEOUT, f"The attempt ran past its {spec.timeout_s:g} s time limit and was killed."), None
    if report is not None:
        try:
            answer = json.loads(report)
        except (ValueError, RecursionError):
            answer = None
        if isinstance(answer, dict) and answer.get("ok") is True:
            return None, answer.get("result")
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            return _known_error(answer["error"]), None
        return failed(ErrorType.CRASHED, "The attempt sent back an unreadable report."), None
    signum = -status if status < 0 else 0
    cpu_s = usage.ru_utime + usage.ru_stime if usage else 0.0
    if signum in (signal.SIGXCPU, signal.SIGKILL) and cpu_s >= math.ceil(spec.timeout_s):
        return failed(ErrorType.TIMEOUT, f"The attempt used its {math.ceil(spec.timeout_s) + 1} s of CPU time and was killed."), None
    if "MemoryError" in stderr_text[-4096:] or "Cannot allocate memory" in stderr_text[-4096:]:
        return failed(ErrorType.MEMORY, f"The attempt ran out of its {spec.memory_mb} MiB of memory."), None
    how = f"was killed by {signal.Signals(signum).name}" if signum else f"exited with code {status}"
    return failed(ErrorType.CRASHED, f"The attempt's process {how} before reporting a result."), None


def _known_error(error: dict) -> dict:
    """Trust only the fields we expect from the runner's error report."""
    try:
        kind = ErrorType(error.get("type"))
    except ValueError:
        kind = ErrorType.CRASHED
    return failed(kind, str(error.get("message", ""))[:4000])


def _spawn(command: list[str], limits: dict, workdir: str, report_fd: int):
    """Start the child in its own session, with rlimits, killed if the worker dies."""
    import subprocess

    def prepare_child() -> None:  # runs in the child between fork and exec
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for which, value in limits.items():
            resource.setrlimit(which, value)

    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(report_fd,), cwd=workdir, env=scrubbed_env(workdir),
        start_new_session=True, preexec_fn=prepare_child,
    )


def _reap(child) -> tuple[int, Any]:
    """Kill whatever is left of the child's process group and collect its status."""
    _kill_group(child.pid)
    try:
        _, raw_status, usage = os.wait4(child.pid, 0)
    except ChildProcessError:
        return child.returncode or 0, None
    child.returncode = os.waitstatus_to_exitcode(raw_status)
    return child.returncode, usage


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Capture:
    """Feeds the child its request and drains its stdout, stderr and report pipes."""

    def __init__(self, settings: Settings, report_fd: int):
        self.stdout = CappedBuffer(settings.max_output_bytes)
        self.stderr = CappedBuffer(settings.max_output_bytes)
        self.report_buffer = CappedBuffer(settings.max_result_bytes + REPORT_SLACK_BYTES)
        self.report_fd = report_fd

    def pump(self, child, request: bytes, deadline: float) -> bool:
        """Move bytes until every pipe closes or the deadline passes; True if it passed."""
        selector = selectors.DefaultSelector()
        sinks = {child.stdout.fileno(): self.stdout, child.stderr.fileno(): self.stderr,
                 self.report_fd: self.report_buffer}
        for fd in sinks:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        stdin_fd = child.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
        exit_fd = os.pidfd_open(child.pid)
        selector.register(exit_fd, selectors.EVENT_READ)
        pending = memoryview(request)
        exited = False
        try:
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return not exited
                for key, _ in selector.select(remaining):
                    fd = key.fd
                    if fd == exit_fd:
                        selector.unregister(exit_fd)
                        exited = True
                        deadline = min(deadline, time.monotonic() + EXIT_DRAIN_S)
                    elif fd == stdin_fd:
                        pending = self._feed(selector, child.stdin, pending)
                    else:
                        self._drain(selector, fd, sinks[fd])
            return False
        finally:
            selector.close()
            os.close(exit_fd)
            for stream in (child.stdin, child.stdout, child.stderr):
                stream.close()
            os.close(self.report_fd)

    def report(self) -> str | None:
        if self.report_buffer.dropped:
            return json.dumps({"ok": False, "error": failed(ErrorType.RESULT_LIMIT, "The result is larger than the limit.")})
        data = b"".join(self.report_buffer.chunks)
        return data.decode("utf-8", errors="replace") if data else None

    @staticmethod
    def _feed(selector, stdin, pending: memoryview) -> memoryview:
        fd = stdin.fileno()
        try:
            written = os.write(fd, pending[:READ_CHUNK_BYTES])
        except BrokenPipeError:
            written = len(pending)
        pending = pending[written:]
        if not pending:
            selector.unregister(fd)
            stdin.close()
        return pending

    @staticmethod
    def _drain(selector, fd: int, sink: CappedBuffer) -> None:
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        if data:
            sink.add(data)
        else:
            selector.unregister(fd)
