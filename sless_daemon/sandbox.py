"""The bubblewrap sandbox of one worker, and who and what its attempts run as.

A worker starts one bubblewrap sandbox and keeps it: inside runs the fork server
(runner.py), with a read-only /usr (the Python runtime and its libraries) and
nothing else of the host's files, an empty environment, its own user, PID, network,
IPC, UTS, cgroup and mount namespaces, and a seccomp filter that still refuses
everything but making namespaces and mounts. The server is root of its user
namespace, which is owned by the slot's unprivileged host uid. Every attempt is a
fork of it that enters fresh namespaces of its own, mounts a fresh /proc, /work and
/dev/shm, becomes uid 65534 without capabilities in a new user namespace, and stacks
the full seccomp filter (seccomp_policy.py) before any user code runs. The worker
talks to it over descriptors opened before the sandbox starts and never touches a
path inside it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .cgroups import Cgroups, detect
from .errors import SandboxUnavailable
from .seccomp_policy import SERVER_ALLOWED, build_filter_bpf

RUNNER_INSIDE = "/sless/runner.py"
SECCOMP_INSIDE = "/sless/seccomp.bpf"  # the attempts' filter, read by the server at start
WORKDIR_INSIDE = "/work"
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORKDIR_INSIDE,
               "TMPDIR": WORKDIR_INSIDE}
SHM_BYTES = 4 << 20  # /dev/shm: enough for multiprocessing's semaphores, too small to hoard memory in
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
FIX_HINT = ("Install bubblewrap (apt-get install bubblewrap) and allow unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0); in Docker, give the "
            "worker the security options in docs/SECURITY.md. Only for trusted code: --insecure-no-sandbox.")


@dataclass(frozen=True)
class Sandbox:
    """Everything fixed about this worker's sandbox."""

    bwrap: str
    python: str
    extra_ro_binds: tuple[str, ...]
    server_bpf: bytes  # the fork server's filter: the attempts' minus namespaces and mounts
    attempt_bpf: bytes  # every attempt's filter, stacked on the server's
    host_uid: int | None  # run bubblewrap as this host uid (a worker running as root), else as ourselves
    cgroups: Cgroups | None


def sandbox_command(sandbox: Sandbox, runner_fd: int, server_seccomp_fd: int, attempt_seccomp_fd: int,
                    control_fd: int, info_fd: int | None = None) -> list[str]:
    """The bubblewrap command line of a worker's sandbox (pure: tested without starting anything).

    bubblewrap's own init is PID 1 of the namespace; when it exits, the kernel kills
    everything else in it. The outer bubblewrap does not wait for that init, so the
    worker is a child subreaper and collects it; `--info-fd` tells it the init's pid.
    """
    command = [
        sandbox.bwrap, "--unshare-all", "--unshare-user", "--unshare-cgroup",
        "--uid", "0", "--gid", "0", "--cap-add", "ALL", "--hostname", "sless",
        "--die-with-parent", "--new-session", "--clearenv",
    ]
    for key, value in SANDBOX_ENV.items():
        command += ["--setenv", key, value]
    command += ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin"]
    for path in sandbox.extra_ro_binds:
        command += ["--ro-bind", path, path]
    command += [
        "--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--dir", WORKDIR_INSIDE, "--symlink", WORKDIR_INSIDE, "/tmp",
        "--perms", "0444", "--ro-bind-data", str(runner_fd), RUNNER_INSIDE,
        "--perms", "0444", "--ro-bind-data", str(attempt_seccomp_fd), SECCOMP_INSIDE,
        "--remount-ro", "/", "--chdir", "/",
        "--seccomp", str(server_seccomp_fd), *(["--info-fd", str(info_fd)] if info_fd is not None else []),
        "--", sandbox.python, "-I", "-S", "-B", RUNNER_INSIDE, str(control_fd),
    ]
    return command


def find_python(configured: str = "") -> tuple[str, tuple[str, ...]]:
    """The interpreter to run inside, and any directory besides /usr it needs bound.

    A system interpreter under /usr is preferred: every user may read it, and /usr
    is bound anyway. Otherwise this interpreter's prefix is bound read-only.
    """
    for candidate in ([configured] if configured else []) + list(SYSTEM_PYTHONS):
        if candidate and os.access(candidate, os.X_OK):
            real = os.path.realpath(candidate)
            return real, () if real.startswith("/usr/") else (str(Path(real).parent.parent),)
    return sys.executable, (sys.base_prefix,)


def slot_uid(uid_base: int, slot: int) -> int | None:
    """A host uid of its own per worker slot when we can switch to it (running as root).

    RLIMIT_NPROC counts per user across the machine, so a fork bomb in one slot then
    cannot take the process slots of another slot's job.
    """
    return uid_base + slot if os.geteuid() == 0 else None


def build_sandbox(python: str, uid_base: int, slot: int) -> Sandbox:
    """Assemble this worker's sandbox (Executor.probe proves it starts); SandboxUnavailable says how to fix it."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed. {FIX_HINT}")
    interpreter, extra = find_python(python)
    try:
        server_bpf, attempt_bpf = build_filter_bpf(SERVER_ALLOWED), build_filter_bpf()
    except (ImportError, OSError, RuntimeError) as e:
        raise SandboxUnavailable(f"cannot build the seccomp filter ({e}); install libseccomp2 and pyseccomp.") from e
    return Sandbox(bwrap, interpreter, extra, server_bpf, attempt_bpf, slot_uid(uid_base, slot), detect())


def drop_privileges(uid: int | None) -> None:
    """In the child before exec: become the slot's unprivileged user, with no groups."""
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
