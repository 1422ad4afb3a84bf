"""Private Redis and FerretDB instances that a test may stop, kill and restart at will.

The session's shared services stay untouched; each private one listens on its own
loopback port with its own data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from stack import free_port

FERRETDB = os.environ.get("SLESS_FERRETDB_BIN") or str(Path.home() / "go" / "bin" / "ferretdb")


def wait_port(port: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class PrivateService:
    """A server process on a port of its own; `kill` is a crash, `stop` a clean stop."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> PrivateService:
        log = open(self.workdir / "server.log", "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        start_new_session=True)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class PrivateRedis(PrivateService):
    """Redis without persistence: a restart loses everything, as the chaos tests want. With
    `persistent`, the append-only file as docker-compose.yml runs it (`appendfsync everysec`)."""

    def __init__(self, workdir: Path, persistent: bool = False):
        super().__init__(workdir)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        return ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *persistence,
                "--dir", str(self.workdir)]


class PrivateFerretDB(PrivateService):
    """FerretDB (SQLite handler) keeping its data in its work directory across restarts."""

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [FERRETDB, "--handler=sqlite", f"--sqlite-url=file:{self.workdir}/?_pragma=synchronous(normal)",
                f"--listen-addr=127.0.0.1:{self.port}",
                "--telemetry=disable", "--debug-addr=-", f"--state-dir={self.workdir}", "--log-level=error"]

    def wipe(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
