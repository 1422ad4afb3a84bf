"""Moving bytes between the worker and one attempt: request in; stdout, stderr and report out.

Everything is capped: output beyond its cap is counted and dropped (with a marker),
a flood past the hard limit ends the attempt, and the report is bounded by the
result limit. The worker's memory never depends on what the job writes.
"""

from __future__ import annotations

import json
import os
import select
import time

from .limits import Limits
from .outcome import failed
from .states import ErrorType

READ_CHUNK_BYTES = 64 << 10
REPORT_SLACK_BYTES = 4096  # room for the report's envelope around the result
EXIT_DRAIN_S = 0.2  # after the child exits, how long to wait for descendants' last output


class CappedBuffer:
    """Keeps the first `limit` bytes of a stream and notes how much was cut."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    @property
    def total(self) -> int:
        return self.kept + self.dropped

    def add(self, data: bytes) -> bytes:
        """Keep what fits; returns the part kept."""
        room = self.limit - self.kept
        kept = data[:room] if room > 0 else b""
        if kept:
            self.chunks.append(kept)
            self.kept += len(kept)
        self.dropped += len(data) - len(kept)
        return kept

    def text(self) -> str:
        text = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[sless: output truncated; {self.dropped} more bytes were dropped]\n"
        return text


class Capture:
    """Feeds the child its request and drains its stdout, stderr and report pipes."""

    def __init__(self, limits: Limits, flood_bytes: int):
        self.stdout = CappedBuffer(limits.output_bytes)
        self.stderr = CappedBuffer(limits.output_bytes)
        self.report_buffer = CappedBuffer(limits.result_bytes + REPORT_SLACK_BYTES)
        self.flood_bytes = flood_bytes

    def pump(self, pipes, exit_fd: int, request: bytes, deadline: float, watch: Watch | None = None) -> str:
        """Move bytes until every pipe closes and the attempt has ended or sent its whole
        report, the deadline passes, output floods or the attempt is cancelled.

        `pipes` are the worker's ends (jobhost.AttemptPipes); `exit_fd` becomes readable
        when the attempt's process tree has ended; `watch` (optional) gets the output as
        it comes and says when the attempt is cancelled, and is told once the whole request
        is in the attempt's stdin (`request_sent`). Returns why it stopped:
        "exited", "timeout", "output_limit" or "cancelled". The pipes are closed on return.
        Once a report has come whole and the output pipes closed, it does not wait for
        `exit_fd`: the outcome is known, and the caller reads the exit status later
        (executor.Executor.collect_ended), while the attempt's processes are torn down.
        Without a report the status decides the outcome, so it waits for it.
        """
        selector = Polled()
        watch = watch or Watch()
        try:
            names = {pipes.stdout: "stdout", pipes.stderr: "stderr"}
            sinks = {pipes.stdout: self.stdout, pipes.stderr: self.stderr, pipes.report: self.report_buffer}
            for fd in sinks:
                os.set_blocking(fd, False)
                selector.register(fd, select.POLLIN)
            os.set_blocking(pipes.stdin, False)
            selector.register(pipes.stdin, select.POLLOUT)
            selector.register(exit_fd, select.POLLIN)
            pending = memoryview(request)
            exited = False
            while selector.fds:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "exited" if exited else "timeout"
                if not exited and watch.cancelled():
                    return "cancelled"
                for fd in selector.ready(min(remaining, watch.interval_s)):
                    if fd not in selector.fds:
                        continue  # unregistered by an earlier event of this batch (the report's end)
                    if fd == exit_fd:
                        selector.unregister(exit_fd)
                        exited = True
                        deadline = min(deadline, time.monotonic() + EXIT_DRAIN_S)
                    elif fd == pipes.stdin:
                        pending = self._feed(selector, pipes, pending)
                        if not pending:
                            watch.request_sent()
                    else:
                        kept = self._drain(selector, fd, sinks[fd])
                        if kept and fd in names:
                            watch.output(names[fd], kept)
                        if fd == pipes.report and pipes.report not in selector.fds:
                            exited = True  # the report is complete: what is left gets a moment, then dies
                            deadline = min(deadline, time.monotonic() + EXIT_DRAIN_S)
                            if self.report_buffer.total and exit_fd in selector.fds:
                                selector.unregister(exit_fd)  # it reported: the status is read later
                if self.output_bytes > self.flood_bytes:
                    return "output_limit"
            return "exited"
        finally:
            watch.done()
            pipes.close()

    @property
    def output_bytes(self) -> int:
        return self.stdout.total + self.stderr.total

    def report(self) -> str | None:
        if self.report_buffer.dropped:
            return json.dumps({"ok": False, "error": failed(ErrorType.RESULT_LIMIT, "The result is larger than the limit.")})
        data = b"".join(self.report_buffer.chunks)
        return data.decode("utf-8", errors="replace") if data else None

    @staticmethod
    def _feed(selector, pipes, pending: memoryview) -> memoryview:
        try:
            written = os.write(pipes.stdin, pending[:READ_CHUNK_BYTES])
        except BrokenPipeError:
            written = len(pending)
        pending = pending[written:]
        if not pending:
            selector.unregister(pipes.stdin)
            pipes.close_stdin()  # the end of the request
        return pending

    @staticmethod
    def _drain(selector, fd: int, sink: CappedBuffer) -> bytes:
        """Read what the pipe has into its sink; returns the part kept."""
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return b""
        if data:
            return sink.add(data)
        selector.unregister(fd)
        return b""


class Polled:
    """The descriptors the capture loop waits on, through poll(2): a `selectors` epoll costs
    a descriptor and a system call per registration, 25 us an attempt more (session 12)."""

    def __init__(self):
        self.poller = select.poll()
        self.fds: set[int] = set()

    def register(self, fd: int, events: int) -> None:
        self.poller.register(fd, events)
        self.fds.add(fd)

    def unregister(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.fds.discard(fd)

    def ready(self, timeout_s: float) -> list[int]:
        """Descriptors readable, writable, closed or failed within `timeout_s`."""
        return [fd for fd, _ in self.poller.poll(max(0.0, timeout_s) * 1000)]  # poll waits for ever below 0


class Watch:
    """What the capture loop tells and asks while an attempt runs; this one does nothing.

    The worker's (worker.AttemptWatch) publishes output to the job's feed and checks for
    a cancel request. The loop asks `cancelled` at least every `interval_s`.
    """

    interval_s = 3600.0

    def sandbox_starting(self) -> None:
        """The attempt waits for a fork server to start (tens of ms; up to jobhost.READY_TIMEOUT_S)."""

    def output(self, stream: str, data: bytes) -> None:
        """Bytes the attempt wrote on "stdout" or "stderr" (only what the cap kept)."""

    def cancelled(self) -> bool:
        return False

    def request_sent(self) -> None:
        """The attempt has its whole request: its code is about to run."""

    def done(self) -> None:
        """The attempt's pipes are closing: publish what is left."""
