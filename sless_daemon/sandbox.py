"""The bubblewrap sandbox an attempt runs in: what it sees, what it may do, who it runs as.

Each attempt gets fresh user, PID, network, IPC, UTS, cgroup and mount namespaces;
a read-only /usr (the Python runtime and its libraries) and nothing else of the
host's files; a size-capped tmpfs as its working directory; its own /proc; uid
65534 with no capabilities; a seccomp filter (seccomp_policy.py); an empty
environment. Code goes in and results come out over descriptors opened before the
sandbox starts; the worker never touches a path inside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .cgroups import Cgroups, detect
from .errors import SandboxUnavailable
from .seccomp_policy import bpf_fd, build_filter_bpf

INSIDE_UID = 65534  # "nobody" inside the user namespace
RUNNER_INSIDE = "/sless/runner.py"
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
    """Everything fixed about this worker's sandboxes; per-attempt parts are arguments."""

    bwrap: str
    python: str
    extra_ro_binds: tuple[str, ...]
    seccomp_bpf: bytes
    host_uid: int | None  # run bubblewrap as this host uid (a worker running as root), else as ourselves
    cgroups: Cgroups | None


def sandbox_command(sandbox: Sandbox, runner_fd: int, seccomp_fd: int, tmpfs_bytes: int,
                    runner_args: list[str], info_fd: int | None = None) -> list[str]:
    """The bubblewrap command line of one attempt (pure: tested without starting anything).

    bubblewrap's own init is PID 1 of the namespace (so user code keeps ordinary
    signal semantics, which PID 1 lacks); when it exits, the kernel kills everything
    else in the namespace. The outer bubblewrap does not wait for that init, so the
    worker is a child subreaper and collects it; `--info-fd` tells it the init's pid.
    """
    command = [
        sandbox.bwrap, "--unshare-all", "--unshare-user", "--unshare-cgroup",
        "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID), "--hostname", "sless",
        "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--clearenv",
    ]
    for key, value in SANDBOX_ENV.items():
        command += ["--setenv", key, value]
    command += ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin"]
    for path in sandbox.extra_ro_binds:
        command += ["--ro-bind", path, path]
    command += [
        "--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", str(tmpfs_bytes), "--tmpfs", WORKDIR_INSIDE, "--symlink", WORKDIR_INSIDE, "/tmp",
        "--perms", "0444", "--ro-bind-data", str(runner_fd), RUNNER_INSIDE,
        "--remount-ro", "/", "--chdir", WORKDIR_INSIDE,
        "--seccomp", str(seccomp_fd), *(["--info-fd", str(info_fd)] if info_fd is not None else []),
        "--", sandbox.python, "-I", "-S", "-B", RUNNER_INSIDE, *runner_args,
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
    """Assemble this worker's sandbox and prove it starts; SandboxUnavailable says how to fix it."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed. {FIX_HINT}")
    interpreter, extra = find_python(python)
    try:
        bpf = build_filter_bpf()
    except (ImportError, OSError, RuntimeError) as e:
        raise SandboxUnavailable(f"cannot build the seccomp filter ({e}); install libseccomp2 and pyseccomp.") from e
    sandbox = Sandbox(bwrap, interpreter, extra, bpf, slot_uid(uid_base, slot), detect())
    probe(sandbox)
    return sandbox


def probe(sandbox: Sandbox) -> None:
    """Start one sandbox that only prints; raise SandboxUnavailable if it cannot."""
    runner_r, runner_w = os.pipe()
    os.write(runner_w, b"print('sandbox-ok')\n")
    os.close(runner_w)
    seccomp_fd = bpf_fd(sandbox.seccomp_bpf)
    command = sandbox_command(sandbox, runner_r, seccomp_fd, 1 << 20, [])
    try:
        done = subprocess.run(command, pass_fds=(runner_r, seccomp_fd), capture_output=True, timeout=10,
                              preexec_fn=lambda: drop_privileges(sandbox.host_uid))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap did not start: {e}. {FIX_HINT}") from e
    finally:
        os.close(runner_r)
        os.close(seccomp_fd)
    if done.stdout.strip() != b"sandbox-ok":
        reason = done.stderr.decode(errors="replace").strip()[-300:] or f"exit code {done.returncode}"
        raise SandboxUnavailable(f"bubblewrap cannot create the sandbox here: {reason}. {FIX_HINT}")


def drop_privileges(uid: int | None) -> None:
    """In the child before exec: become the slot's unprivileged user, with no groups."""
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
