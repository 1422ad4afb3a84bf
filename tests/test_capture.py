"""The capture loop (capture.Capture.pump) on real pipes: how it ends."""

from __future__ import annotations

import os
import socket
import time

from sless_daemon import capture
from sless_daemon.capture import Capture, Watch
from sless_daemon.jobhost import AttemptPipes
from sless_daemon.limits import resolve
from sless_daemon.settings import Settings


class StatusOnSecondLook(Watch):
    """Sends the exit status just before the loop's second wait: the report's data is read
    in the first batch of events, its end and the status come in the second."""

    def __init__(self, server: socket.socket):
        self.server = server
        self.looks = 0

    def cancelled(self) -> bool:
        self.looks += 1
        if self.looks == 2:
            self.server.send(b'{"status": 0}')
        return False


def reported_attempt(report: bytes):
    """The worker's ends of an attempt that wrote `report` and closed its pipes, the control
    socket pair (no status sent yet), and what to close after: (pipes, control, server, stdin_r)."""
    stdin_r, stdin_w = os.pipe()
    ends = {}
    for name in ("stdout", "stderr", "report"):
        read_end, write_end = os.pipe()
        if name == "report":
            os.write(write_end, report)
        os.close(write_end)
        ends[name] = read_end
    control, server = socket.socketpair()
    return AttemptPipes(stdin_w, ends["stdout"], ends["stderr"], ends["report"]), control, server, stdin_r


def pump(report: bytes, deadline_s: float, watch_for=None) -> tuple[str, Capture, socket.socket, float]:
    """Run the loop over such an attempt; (how it ended, the capture, the control socket, time left)."""
    pipes, control, server, stdin_r = reported_attempt(report)
    loop = Capture(resolve({}, Settings.from_env({})), flood_bytes=1 << 20)
    deadline = time.monotonic() + deadline_s
    try:
        ended_by = loop.pump(pipes, control.fileno(), b"{}", deadline, watch_for(server) if watch_for else None)
        left_s = deadline - time.monotonic()
        return ended_by, loop, control, left_s
    finally:
        os.close(stdin_r)
        server.close()


def test_the_report_end_and_the_exit_status_in_one_batch_end_the_attempt():
    """The report's end stops the wait for the status (it is read later), so the status
    event of the same batch must be skipped: handled again, it raised KeyError and failed
    the attempt."""
    ended_by, loop, control, _ = pump(b'{"ok": true, "result": 42}', 30, StatusOnSecondLook)
    try:
        assert ended_by == "exited"
        assert loop.report() == '{"ok": true, "result": 42}'
        assert control.recv(100) == b'{"status": 0}'  # left for the executor (Executor.collect_ended)
    finally:
        control.close()


def test_a_whole_report_ends_the_attempt_without_its_exit_status(monkeypatch):
    """The outcome is known once the report is whole and the output pipes closed: the loop
    does not wait for the exit status (the executor reads it before the next attempt),
    nor for the drain period it gives descendants after an exit, made an hour here."""
    monkeypatch.setattr(capture, "EXIT_DRAIN_S", 3600.0)
    ended_by, loop, control, left_s = pump(b'{"ok": true, "result": 1}', 60)  # the status never comes
    control.close()
    assert ended_by == "exited" and loop.report() == '{"ok": true, "result": 1}'
    assert left_s > 30  # it did not wait for the deadline (a liveness bound)


class ReadsTheRequest(Watch):
    """Reads what the attempt's stdin holds when the loop says the request is sent."""

    def __init__(self, stdin_r: int):
        self.stdin_r = stdin_r
        self.seen: bytes | None = None

    def request_sent(self) -> None:
        self.seen = os.read(self.stdin_r, 1 << 16)


def test_the_watch_is_told_once_the_whole_request_is_in_the_attempt_s_stdin():
    """The worker's recorder waits for this (worker.Recorder.defer_writes): told early, it would write
    while the next job is still being started; never told, it would wait DEFER_MAX_S each time."""
    pipes, control, server, stdin_r = reported_attempt(b'{"ok": true, "result": 42}')
    os.set_blocking(stdin_r, False)  # told before the write, the read fails instead of waiting
    watch = ReadsTheRequest(stdin_r)
    loop = Capture(resolve({}, Settings.from_env({})), flood_bytes=1 << 20)
    try:
        assert loop.pump(pipes, control.fileno(), b'{"input": 21}', time.monotonic() + 5, watch) == "exited"
    finally:
        os.close(stdin_r)
        server.close()
    assert watch.seen == b'{"input": 21}' and loop.report() == '{"ok": true, "result": 42}'
