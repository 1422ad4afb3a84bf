"""A worker's fork server: one sandbox, started once, that makes a fresh sandbox per attempt.

Starting bubblewrap and an interpreter costs tens of milliseconds; forking a warm
interpreter that then enters new namespaces costs a few (the SOCK design, USENIX ATC
2018). So each worker keeps one sandbox running the fork server (runner.py) and
sends it one order per attempt, with the attempt's pipes attached. What isolates
attempts from each other is described in runner.py and sandbox.py; here is the
worker's side: start the server, send orders, read exit statuses, set the cgroup's
limits per attempt, and kill the whole sandbox whenever an attempt does not end by
itself (timeout, flood, lingering processes). The next attempt then gets a new one.

Without a sandbox (`--insecure-no-sandbox`) the same server runs as a plain process
with `--plain`: fork, change directory, rlimits, nothing more.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .capture import Polled
from .cgroups import JobCgroup
from .errors import SandboxUnavailable
from .limits import Limits
from .sandbox import FIX_HINT, SANDBOX_ENV, Sandbox, drop_privileges, sandbox_command
from .seccomp_policy import bpf_fd
from .settings import Settings

log = logging.getLogger(__name__)

RUNNER_PATH = Path(__file__).with_name("runner.py")
PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 10.0
REAP_TIMEOUT_S = 5.0
SERVER_PROCESSES = 4  # bubblewrap's two, the server, and one spare while an attempt's tree is set up
ATTEMPT_SETUP_PROCESSES = 1  # the attempt's init, PID 1 of its namespace beside the job (runner.py)
SERVER_MEMORY_BYTES = 64 << 20  # room for bubblewrap and the idle server, above the largest attempt
_numbers = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)


def attempt_rlimits(limits: Limits, isolated: bool) -> list[list[int]]:
    """The rlimits of one attempt: memory, CPU seconds, files, no core dumps, and processes.

    RLIMIT_NPROC counts processes per user per user namespace; an isolated attempt has a
    user namespace of its own, so there the count is exactly the attempt's processes.
    """
    memory = limits.memory_mb << 20
    cpu_s = -(-int(limits.cpu_s * 1000) // 1000)  # whole seconds, rounded up
    rlimits = [
        [resource.RLIMIT_AS, memory, memory],
        [resource.RLIMIT_CPU, cpu_s, cpu_s + 1],  # SIGXCPU first, SIGKILL a second later
        [resource.RLIMIT_NOFILE, limits.open_files, limits.open_files],
        [resource.RLIMIT_FSIZE, limits.file_mb << 20, limits.file_mb << 20],
        [resource.RLIMIT_CORE, 0, 0],
    ]
    if isolated:
        rlimits.append([resource.RLIMIT_NPROC, limits.processes, limits.processes])
    return rlimits


def server_rlimits(settings: Settings, own_uid: bool) -> dict[int, tuple[int, int]]:
    """The server's rlimits: at least every attempt's largest, since attempts can only lower them."""
    memory = (settings.max_memory_mb << 20) + SERVER_MEMORY_BYTES
    files = settings.max_open_files + 16
    rlimits = {
        resource.RLIMIT_AS: (memory, memory),
        resource.RLIMIT_NOFILE: (files, files),
        resource.RLIMIT_FSIZE: (settings.max_file_mb << 20, settings.max_file_mb << 20),
        resource.RLIMIT_CORE: (0, 0),
    }
    if own_uid:  # counts every process of the slot's uid: the server's and its attempts'
        processes = settings.max_processes + SERVER_PROCESSES + ATTEMPT_SETUP_PROCESSES
        rlimits[resource.RLIMIT_NPROC] = (processes, processes)
    return rlimits


@dataclass
class AttemptPipes:
    """The worker's ends of one attempt's pipes."""

    stdin: int
    stdout: int
    stderr: int
    report: int

    def close_stdin(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1

    def close(self) -> None:
        self.close_stdin()
        for fd in (self.stdout, self.stderr, self.report):
            if fd >= 0:
                os.close(fd)
        self.stdout = self.stderr = self.report = -1


class JobHost:
    """One running fork server; asked for one attempt at a time."""

    def __init__(self, process: subprocess.Popen, control: socket.socket, cgroup: JobCgroup | None,
                 info_fd: int | None, reap_init: bool):
        self.process = process
        self.control = control
        self.cgroup = cgroup
        self.info_fd = info_fd
        self.reap_init = reap_init
        self.breaches_before: dict[str, int] = {}
        self.idle_processes = 0  # the idle server's processes in its cgroup (bubblewrap's two and itself)
        self.stopped = False

    @classmethod
    def start(cls, settings: Settings, sandbox: Sandbox | None, name: str, reap_init: bool = False) -> JobHost:
        """Start a server and wait until it can take attempts; SandboxUnavailable if it cannot."""
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if sandbox is None:
                host = cls._start_plain(settings, theirs.fileno(), control)
            else:
                host = cls._start_sandboxed(settings, sandbox, name, theirs.fileno(), control, reap_init)
        except BaseException:
            control.close()
            raise
        finally:
            theirs.close()
        host._wait_ready()
        return host

    @classmethod
    def _start_plain(cls, settings: Settings, control_fd: int, control: socket.socket) -> JobHost:
        command = [sys.executable, "-I", "-S", "-B", str(RUNNER_PATH), str(control_fd), "--plain"]
        process = _spawn(command, (control_fd,), "/", SANDBOX_ENV, server_rlimits(settings, False), None, None)
        return cls(process, control, None, None, False)

    @classmethod
    def _start_sandboxed(cls, settings: Settings, sandbox: Sandbox, name: str, control_fd: int,
                         control: socket.socket, reap_init: bool) -> JobHost:
        cgroup = None
        if sandbox.cgroups:
            cgroup = sandbox.cgroups.create(f"{name}-{os.getpid()}-{next(_numbers)}",
                                            (settings.max_memory_mb << 20) + SERVER_MEMORY_BYTES,
                                            settings.max_processes + SERVER_PROCESSES + ATTEMPT_SETUP_PROCESSES)
        data_fds = [_data_fd(RUNNER_PATH.read_bytes()), bpf_fd(sandbox.server_bpf), bpf_fd(sandbox.attempt_bpf)]
        info_r, info_w = os.pipe()
        command = sandbox_command(sandbox, data_fds[0], data_fds[1], data_fds[2], control_fd, info_w)
        try:
            process = _spawn(command, (control_fd, info_w, *data_fds), "/", SANDBOX_ENV,
                             server_rlimits(settings, sandbox.host_uid is not None), cgroup, sandbox.host_uid)
        except BaseException:
            os.close(info_r)
            if cgroup:
                cgroup.remove()
            raise
        finally:
            for fd in (info_w, *data_fds):
                os.close(fd)
        return cls(process, control, cgroup, info_r, reap_init)

    def _wait_ready(self) -> None:
        if _readable(self.control, READY_TIMEOUT_S):
            try:
                if json.loads(self.control.recv(4096) or b"{}").get("ready"):
                    self.idle_processes = self.cgroup.processes_in_use() if self.cgroup else 0
                    return
            except (OSError, ValueError):
                pass
        self.stop()
        raise SandboxUnavailable(f"the sandbox did not start (exit code {self.process.returncode}; the worker's "
                                 f"log has its message). {FIX_HINT}")

    @property
    def alive(self) -> bool:
        return not self.stopped and self.process.poll() is None

    def begin(self, limits: Limits, workdir: str | None) -> AttemptPipes:
        """Send the order of one attempt; returns the worker's ends of its pipes.

        The order may go while the previous attempt is still being torn down: the server
        reads it only once that attempt's whole tree is gone and its status sent.
        Raises OSError when the server is gone (the caller starts a new one).
        """
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        report_r, report_w = os.pipe()
        theirs = [stdin_r, stdout_w, stderr_w, report_w]
        order = {"rlimits": attempt_rlimits(limits, isolated=self.info_fd is not None),
                 "tmpfs_bytes": limits.tmpfs_mb << 20, "result_bytes": limits.result_bytes, "workdir": workdir}
        try:
            socket.send_fds(self.control, [json.dumps(order).encode()], theirs)
        except OSError:
            AttemptPipes(stdin_w, stdout_r, stderr_r, report_r).close()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return AttemptPipes(stdin_w, stdout_r, stderr_r, report_r)

    def limit(self, limits: Limits) -> None:
        """Set the cgroup's limits for the attempt about to be sent its request, and note its
        breach counters. Only once the previous attempt's status is read (executor.collect_ended):
        until its processes are gone, what they hold would count as the idle server's."""
        if self.cgroup:
            self.cgroup.limit_attempt(limits.memory_mb << 20,
                                      self.idle_processes + limits.processes + ATTEMPT_SETUP_PROCESSES)
            self.breaches_before = self.cgroup.breach_counters()

    def end(self, wait_s: float = 0.0) -> tuple[int | None, frozenset[str]]:
        """The attempt's exit status (None: it did not end by itself within `wait_s`, so the
        sandbox was killed) and the cgroup limits it hit."""
        status = None
        if _readable(self.control, wait_s):
            try:
                status = json.loads(self.control.recv(4096) or b"{}").get("status")
            except (OSError, ValueError):
                status = None
        breaches = self._breaches()
        if status is None:
            self.stop()
        return status, breaches

    def _breaches(self) -> frozenset[str]:
        if not self.cgroup:
            return frozenset()
        after = self.cgroup.breach_counters()
        return frozenset(name for name, count in after.items() if count > self.breaches_before.get(name, 0))

    def stop(self) -> None:
        """Kill the whole sandbox (the namespaces die with bubblewrap) and clean up after it."""
        if self.stopped:
            return
        self.stopped = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.error("cannot signal the sandbox (pid %d): the worker needs CAP_KILL", self.process.pid)
        try:
            self.process.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the sandbox (pid %d) did not die; leaving it", self.process.pid)
        self.control.close()
        self._collect_init()
        if self.cgroup:
            self.cgroup.remove()

    def _collect_init(self) -> None:
        """Collect the sandbox's init, orphaned to us when the outer bubblewrap died first."""
        if self.info_fd is None:
            return
        try:
            os.set_blocking(self.info_fd, False)
            info = json.loads(os.read(self.info_fd, 4096) or b"{}")
        except (OSError, ValueError):
            info = {}
        finally:
            os.close(self.info_fd)
            self.info_fd = None
        pid = info.get("child-pid")
        if not (self.reap_init and isinstance(pid, int)):
            return
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return  # not ours (yet): someone else collects it
            time.sleep(0.001)


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether `sock` has a message, or its end, within `timeout_s`."""
    waiting = Polled()
    waiting.register(sock.fileno(), select.POLLIN)
    return bool(waiting.ready(timeout_s))


def _data_fd(data: bytes) -> int:
    """A readable descriptor holding `data` (the runner's source, a few KiB)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies (cleared by a uid
    change, kept across exec), so nothing it runs outlives whoever supervises it."""
    _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _spawn(command, pass_fds, cwd, env, limits, cgroup: JobCgroup | None, uid: int | None):
    """Start the server in its own session: cgroup, rlimits, unprivileged uid, dies with us."""

    def prepare_child() -> None:  # runs in the child between fork and exec
        if cgroup:
            cgroup.join_self()
        for which, value in limits.items():
            resource.setrlimit(which, value)
        drop_privileges(uid)
        die_with_parent(signal.SIGKILL)  # after the uid change, which clears it

    return subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=pass_fds, cwd=cwd, env=env,
                            start_new_session=True, preexec_fn=prepare_child)
