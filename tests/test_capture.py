"""The capture loop (capture.Capture.pump) on real pipes: how it ends."""

from __future__ import annotations

import os
import socket
import time

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


def test_the_report_end_and_the_exit_status_in_one_batch_end_the_attempt():
    """The report's end stops the wait for the status (it is read later), so the status
    event of the same batch must be skipped: handled again, it raised KeyError and failed
    the attempt."""
    stdin_r, stdin_w = os.pipe()
    ends = {}
    for name in ("stdout", "stderr", "report"):
        read_end, write_end = os.pipe()
        if name == "report":
            os.write(write_end, b'{"ok": true, "result": 42}')
        os.close(write_end)
        ends[name] = read_end
    control, server = socket.socketpair()
    capture = Capture(resolve({}, Settings.from_env({})), flood_bytes=1 << 20)
    pipes = AttemptPipes(stdin_w, ends["stdout"], ends["stderr"], ends["report"])
    try:
        ended_by = capture.pump(pipes, control.fileno(), b"{}", time.monotonic() + 30, StatusOnSecondLook(server))
        assert ended_by == "exited"
        assert capture.report() == '{"ok": true, "result": 42}'
        assert control.recv(100) == b'{"status": 0}'  # left for the executor (Executor.collect_ended)
    finally:
        os.close(stdin_r)
        control.close()
        server.close()
