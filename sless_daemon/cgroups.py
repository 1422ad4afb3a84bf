"""Control groups: memory and process limits that hold for a job's whole process tree.

rlimits are per process (RLIMIT_AS) or per user (RLIMIT_NPROC), so a job that forks
could add up past its memory limit. Each worker's sandbox lives in a cgroup of its
own; it runs one attempt at a time. When an attempt is about to be sent its request
(the previous one gone, its own sandbox ordered and usually made), the memory limit is
set to what is in use then plus the attempt's own, and the process limit to the idle
fork server's processes plus the attempt's, so the cap holds for the attempt as a whole.
(What is in use then may include the attempt's sandbox, made ahead of its request:
under 1 MiB, BENCHMARKS.md session 11, which its code gets on top of its memory limit.)
Breaches are read as counter changes across the attempt. Both cgroup v2 (unified, with
the memory and pids controllers) and v1 (separate memory and pids hierarchies) are
supported; where neither is writable (an unprivileged container), `detect` returns
None and the sandbox relies on rlimits and a user id per worker slot.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "sless"
CONTROL_FILES = {  # what each attempt reads or writes, by cgroup version
    2: ("memory.current", "pids.current", "memory.max", "memory.swap.max", "pids.max", "memory.events",
        "pids.events"),
    1: ("memory.usage_in_bytes", "pids.current", "memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "pids.max",
        "memory.events", "memory.oom_control", "memory.failcnt", "pids.events"),
}


class JobCgroup:
    """The cgroup(s) of one worker's sandbox: limits set per attempt, removed with the sandbox.

    Which control files exist is looked up once: every attempt reads and writes them
    (twice five files), and a `stat` plus a `pathlib` open per file cost the worker about
    0.3 ms per job (py-spy, BENCHMARKS.md, session 4, step 11).
    """

    def __init__(self, dirs: list[Path], version: int):
        self.dirs = dirs
        self.version = version
        self.files = {name: [str(d / name) for d in dirs if (d / name).exists()] for name in CONTROL_FILES[version]}

    def join_self(self) -> None:
        """Move the calling process in (used in the child between fork and exec)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text("0")

    def limit_attempt(self, memory_bytes: int, max_processes: int) -> None:
        """Allow the memory in use now plus the attempt's own, and `max_processes` in all."""
        memory_in_use = self._read_number("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        for file, value in limit_files(self.version, memory_in_use + memory_bytes, max_processes):
            for path in self.files[file]:
                _write_limit(path, value)

    def processes_in_use(self) -> int:
        """Processes and threads in the cgroup now (read once, with the fork server idle: JobHost)."""
        return self._read_number("pids.current")

    def breach_counters(self) -> dict[str, int]:
        """Counters that grow when the kernel kills or refuses memory or processes here."""
        memory = sum(_counter(_read(path), "oom_kill") for path in self.files["memory.events"])
        memory += sum(_counter(_read(path), "oom_kill") for path in self.files.get("memory.oom_control", ()))
        memory += sum(int(_read(path) or 0) for path in self.files.get("memory.failcnt", ()))
        processes = sum(_counter(_read(path), "max") for path in self.files["pids.events"])
        return {"memory": memory, "processes": processes}

    def _read_number(self, file: str) -> int:
        for path in self.files[file]:
            return int(_read(path) or 0)
        return 0

    def remove(self) -> None:
        """Kill anything still inside, then delete the cgroup."""
        for d in self.dirs:
            for _ in range(500):  # members exit within a few ms of the kill
                if _kill_members(d) == 0:
                    break
                time.sleep(0.001)
            try:
                d.rmdir()
            except OSError:
                time.sleep(0.05)
                try:
                    d.rmdir()
                except OSError:
                    pass  # left for the next start's clean-up


class Cgroups:
    """Where per-job cgroups are made; one instance per worker process."""

    def __init__(self, bases: list[Path], version: int):
        self.bases = bases
        self.version = version

    def create(self, name: str, memory_bytes: int, max_processes: int) -> JobCgroup:
        dirs = [base / name for base in self.bases]
        for d in dirs:
            d.mkdir(exist_ok=True)
        for d in dirs:
            for file, value in limit_files(self.version, memory_bytes, max_processes):
                _write_if_present(d / file, value)
        return JobCgroup(dirs, self.version)

    def remove_stale(self, prefix: str) -> int:
        """Remove cgroups left by dead executors of this host (named `<prefix>...-<pid>-<n>`).

        Only names with this host's prefix: another host or container sharing the
        cgroup tree has its own PIDs, which this one cannot check.
        """
        removed = 0
        for base in self.bases:
            for d in base.iterdir():
                owner = d.name.rsplit("-", 2)
                if (d.is_dir() and d.name.startswith(prefix) and len(owner) == 3 and owner[1].isdigit()
                        and not _alive(int(owner[1]))):
                    JobCgroup([d], self.version).remove()
                    removed += 1
        return removed



def limit_files(version: int, memory_bytes: int, max_processes: int) -> list[tuple[str, int]]:
    """What to write to set the limits. In v1 memory+swap may not be below memory, so it is
    written on both sides of memory (one of the two writes fails, harmlessly, whichever way
    the limit moves)."""
    if version == 2:
        return [("memory.max", memory_bytes), ("memory.swap.max", 0), ("pids.max", max_processes)]
    return [("memory.memsw.limit_in_bytes", memory_bytes), ("memory.limit_in_bytes", memory_bytes),
            ("memory.memsw.limit_in_bytes", memory_bytes), ("pids.max", max_processes)]


def detect() -> Cgroups | None:
    """Usable cgroups with memory and pids control, or None."""
    try:
        return _detect_v2() or _detect_v1()
    except OSError:
        return None


def _detect_v2() -> Cgroups | None:
    controllers = ROOT / "cgroup.controllers"
    if not controllers.exists() or not {"memory", "pids"} <= set(controllers.read_text().split()):
        return None
    base = ROOT / GROUP
    base.mkdir(exist_ok=True)
    (ROOT / "cgroup.subtree_control").write_text("+memory +pids")
    (base / "cgroup.subtree_control").write_text("+memory +pids")
    return Cgroups([base], 2)


def _detect_v1() -> Cgroups | None:
    bases = [ROOT / "memory" / GROUP, ROOT / "pids" / GROUP]
    if not all(b.parent.is_dir() and os.access(b.parent, os.W_OK) for b in bases):
        return None
    for b in bases:
        b.mkdir(exist_ok=True)
    return Cgroups(bases, 1)


def _write_if_present(path: Path, value) -> None:
    """Set a limit file if this kernel has it."""
    if path.exists():
        _write_limit(str(path), value)


def _write_limit(path: str, value) -> None:
    """Set a limit file; swap files are missing without swap accounting and may refuse."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError:
        name = os.path.basename(path)
        if "swap" not in name and "memsw" not in name:
            raise


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _kill_members(cgroup_dir: Path) -> int:
    try:
        pids = [int(p) for p in (cgroup_dir / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0
