"""The executor on its own: real child processes, real limits, no services needed."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from sless_daemon.capture import Watch
from sless_daemon.executor import Executor
from sless_daemon.limits import resolve
from sless_daemon.sandbox import build_sandbox
from sless_daemon.settings import Settings
from sless_daemon.spec import JobSpec

SETTINGS = Settings.from_env({}, default_output_bytes=4096, max_output_bytes=8192, max_output_flood_bytes=1 << 20)


@pytest.fixture(scope="module", params=["sandboxed", "insecure"])
def executor(request):
    """Both executor paths: the bubblewrap sandbox, and the explicit insecure mode."""
    sandbox = build_sandbox("", SETTINGS.sandbox_uid_base + 90, slot=0) if request.param == "sandboxed" else None
    return Executor(SETTINGS, sandbox)


def run(executor, code, value=None, **limits):
    entry = limits.pop("entry", None)
    spec = JobSpec(code=code, input=value, limits=resolve({"timeout_s": 2.0, **limits}, SETTINGS), retries=0,
                   entry=entry)
    return executor.run(spec, {"job_id": "t", "attempt": 1, "max_attempts": 1, "timeout_s": spec.timeout_s})


def test_function_body_and_module_forms(executor):
    assert run(executor, "return input * 2;", 21).result == 42
    assert run(executor, "def main(x):\n    return x + 1", 1).result == 2
    assert run(executor, "def helper(x):\n    return x * 10\nreturn helper(input)", 2).result == 20
    assert run(executor, '"""doc\n  string"""\ns = """a\n  b"""\nreturn s', None).result == "a\n  b"


def test_an_attempt_reports_when_its_sandbox_was_made_and_its_code_ran(executor):
    """The stages of GET /status's `timings` and of bench/job_gaps.py (the sandbox's clock is the host's)."""
    outcome = run(executor, "return 1")
    t = outcome.timings
    assert t["sandbox_asked_at"] <= t["sandbox_ready_at"] <= t["code_started_at"], t
    assert 0 < t["sandbox_made_at"] <= t["code_started_at"], t
    assert t["code_started_at"] <= t["code_ended_at"], t


def test_context_reaches_functions_that_take_it(executor):
    assert run(executor, "def main(x, context):\n    return context['attempt']").result == 1
    assert run(executor, "return context['job_id']").result == "t"


def test_wall_clock_timeout_kills_a_sleeper(executor):
    outcome = run(executor, "import time; time.sleep(60)", timeout_s=0.5)
    assert outcome.error["type"] == "timeout"
    assert outcome.duration_ms < 2000  # the limit fired near 0.5 s


def test_cpu_spin_that_ignores_signals_is_killed(executor):
    code = "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True: pass"
    assert run(executor, code, timeout_s=0.5).error["type"] == "timeout"


def test_memory_limit(executor):
    outcome = run(executor, "x = bytearray(512 << 20)\nreturn len(x)", memory_mb=64)
    assert outcome.error["type"] == "memory"
    assert run(executor, "x = bytearray(16 << 20)\nreturn len(x)", memory_mb=128).result == 16 << 20


def test_output_flood_ends_the_attempt(executor):
    outcome = run(executor, "import sys\nwhile True: sys.stdout.write('f' * 65536)")
    assert outcome.error["type"] == "output_limit"
    assert len(outcome.stdout) < 4096 + 200


def test_output_is_capped_with_a_marker(executor):
    outcome = run(executor, "import sys\nfor _ in range(2000):\n    print('z' * 99)\n    print('e' * 99, file=sys.stderr)\nreturn 1")
    assert outcome.ok
    for text in (outcome.stdout, outcome.stderr):
        assert text.count("z" * 99) <= 42 and "[sless: output truncated;" in text
        assert len(text) < 4096 + 200


def test_environment_is_scrubbed(executor):
    os.environ["SLESS_SECRET_FOR_TEST"] = "leak"
    try:
        env = run(executor, "import os; return dict(os.environ)").result
    finally:
        del os.environ["SLESS_SECRET_FOR_TEST"]
    assert not [k for k in env if k.startswith("SLESS_")]
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "PWD"}


def test_only_the_standard_library_is_importable(executor):
    outcome = run(executor, "import sless_daemon")
    assert outcome.error["type"] == "exception" and "ModuleNotFoundError" in outcome.error["message"]
    assert run(executor, "import json, re, math; return math.floor(2.5)").result == 2


def test_crash_exit_and_sys_exit(executor):
    assert run(executor, "import os; os.abort()").error["type"] == "crashed"
    assert "code 3" in run(executor, "import os; os._exit(3)").error["message"]
    assert run(executor, "raise SystemExit(4)").error == {"type": "exception", "message": "SystemExit: 4"}


def test_result_limits(executor):
    assert run(executor, "return 'x' * (2 << 20)").error["type"] == "result_limit"
    assert run(executor, "return float('inf')").error["type"] == "invalid_result"
    assert run(executor, "a = []\nfor _ in range(50000): a = [a]\nreturn a").error["type"] == "invalid_result"


def test_forged_report_only_affects_its_own_job(executor):
    """User code can write to its report pipe, but only ever about itself."""
    outcome = run(executor, "import os, sys\nos.write(3, b'garbage')\nos._exit(0)")
    assert outcome.error["type"] == "crashed"


@pytest.fixture(scope="module")
def sandboxed():
    return Executor(SETTINGS, build_sandbox("", SETTINGS.sandbox_uid_base + 91, slot=0))


def test_children_do_not_outlive_the_attempt(sandboxed):
    """A child that detaches (new session, ignores SIGHUP) is still gone when the attempt ends.

    Only the sandbox promises this (its PID namespace dies with the attempt); the
    insecure mode kills the process group, which a new session leaves.
    """
    executor = sandboxed
    code = ("import os, signal, subprocess\n"
            "p = subprocess.Popen(['/usr/bin/sleep', '37.5'], start_new_session=True, preexec_fn=lambda: "
            "signal.signal(signal.SIGHUP, signal.SIG_IGN))\nreturn p.pid")
    assert run(executor, code).ok
    time.sleep(0.2)
    assert not living("sleep 37.5"), "the detached child outlived its attempt"


def test_orphans_are_reaped_while_the_attempt_runs(sandboxed):
    """The attempt's init reaps what it inherits: 60 orphaned grandchildren pass a limit of 8 processes.

    Unreaped, each would stay a zombie holding one of the 8 until the attempt ended.
    """
    code = ("import os\nfor _ in range(60):\n    pid = os.fork()\n    if pid == 0:\n        if os.fork() == 0:\n"
            "            os._exit(0)\n        os._exit(0)\n    os.waitpid(pid, 0)\nreturn 'all forked'")
    outcome = run(sandboxed, code, processes=8, timeout_s=5)
    assert outcome.result == "all forked", outcome


def test_the_job_is_not_its_namespaces_init(sandboxed):
    """PID 1 ignores signals it has no handler for; the job is PID 2, so its own SIGTERM ends it."""
    assert run(sandboxed, "import os\nreturn os.getpid()").result == 2
    outcome = run(sandboxed, "import os, signal\nos.kill(1, signal.SIGKILL)\nos.kill(os.getpid(), signal.SIGTERM)")
    assert outcome.error["type"] == "crashed" and "SIGTERM" in outcome.error["message"], outcome.error


def test_a_child_cloned_beside_the_job_ends_with_it_and_the_server_goes_on(sandboxed):
    """clone(CLONE_PARENT) gives the fork server a child inside the attempt's namespace;
    the server must reap it while the namespace ends, or it would wait for the init forever
    (and the worker replace the whole sandbox)."""
    assert run(sandboxed, "return 1").result == 1
    server = sandboxed.host.process.pid
    code = ("import ctypes, os\nif ctypes.CDLL(None).syscall(56, 0x8000 | 17, 0, 0, 0, 0) == 0:\n"
            "    os.execv('/usr/bin/sleep', ['sleep', '41.5'])\nreturn 'cloned'")
    assert run(sandboxed, code, timeout_s=5).result == "cloned"
    assert run(sandboxed, "return 'next'").result == "next"
    assert sandboxed.host.process.pid == server, "the fork server was replaced"
    assert not living("sleep 41.5"), "the cloned child outlived its attempt"


def test_no_scheduler_priority_crosses_attempts(sandboxed):
    """Each attempt is a session of its own: a job that lowers its autogroup's priority lowers only its own."""
    assert run(sandboxed, "open('/proc/self/autogroup', 'w').write('19')\nreturn 1").result == 1
    assert run(sandboxed, "return open('/proc/self/autogroup').read()").result.endswith("nice 0\n")


def living(command_line: str) -> list[str]:
    """Pids of processes whose command line matches, zombies (dead, not yet reaped) left out."""
    found = subprocess.run(["pgrep", "-f", command_line], capture_output=True, text=True).stdout.split()
    states = {}
    for pid in found:
        try:
            states[pid] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass  # gone meanwhile
    return [pid for pid, state in states.items() if state != "Z"]


def test_the_executor_survives_a_burst_of_hostile_attempts(executor):
    for code in ("while True: pass", "import os; os._exit(1)", "return object()", "x = 'y' * (1 << 40)"):
        run(executor, code, timeout_s=0.3)
    assert run(executor, "return 'alive'").result == "alive"


def test_cpu_limit_below_the_wall_clock_is_a_timeout(sandboxed):
    outcome = run(sandboxed, "while True: pass", timeout_s=5, cpu_s=1)
    assert outcome.error["type"] == "timeout" and "CPU time" in outcome.error["message"], outcome.error
    assert outcome.duration_ms < 4000  # the CPU limit fired, not the wall clock


def test_memory_of_the_whole_process_tree_is_limited(sandboxed):
    """Four children of 100 MiB each pass a 256 MiB per-process limit, not the job's cgroup."""
    if sandboxed.sandbox.cgroups is None:
        pytest.fail("this machine's worker has no writable cgroups; the per-job memory limit is untested")
    code = ("import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = b'x' * (100 << 20)\n        time.sleep(3)\n        os._exit(0)\n    pids.append(pid)\n"
            "return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]")
    outcome = run(sandboxed, code, timeout_s=5, memory_mb=256)
    assert outcome.error or -9 in outcome.result, outcome  # the kernel killed a child at the job's limit
    assert run(sandboxed, code.replace("100 << 20", "20 << 20"), timeout_s=5, memory_mb=256).result == [0, 0, 0, 0]


def test_what_an_attempt_held_as_it_ended_does_not_raise_the_next_one_s_limit(sandboxed):
    """The next spare is ordered while the attempt that reported is torn down (Executor.prepare),
    so its limit must be set from what is in use after that one is gone, not at the order."""
    if sandboxed.sandbox.cgroups is None:
        pytest.fail("this machine's worker has no writable cgroups; the per-job memory limit is untested")
    limits = sandboxed.default_limits  # the spare's: the second attempt takes it
    assert limits.memory_mb == 256
    fork = ("import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = b'x' * (50 << 20)\n        time.sleep(3)\n        os._exit(0)\n    pids.append(pid)\n")
    held = "global b\nb = b'x' * (200 << 20)\nreturn 'held'"  # freed as its process exits, after the report
    waited = fork + "return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]"

    def spec(code: str) -> JobSpec:
        return JobSpec(code=code, input=None, limits=limits, retries=0)

    for _ in range(2):
        assert sandboxed.run(spec(held)).result == "held"
        sandboxed.prepare()
        outcome = sandboxed.run(spec(waited.replace("50 << 20", "100 << 20")))  # 400 MiB: over 256 whatever came before
        assert (outcome.error or {}).get("type") == "memory" or -9 in (outcome.result or []), outcome
        sandboxed.prepare()
    assert sandboxed.run(spec(waited)).result == [0, 0, 0, 0]  # 200 MiB fits


def test_a_cgroup_that_refuses_the_limits_costs_the_attempt_its_fork_server_not_its_run(sandboxed):
    """Executor._limited: the limits are written as the attempt is taken; a cgroup gone from under
    the worker (here: one of its limit files made unwritable) gets the attempt a new fork server."""
    if sandboxed.sandbox.cgroups is None:
        pytest.fail("this machine's worker has no writable cgroups")
    sandboxed.prepare()
    broken = sandboxed.host
    name = "memory.max" if broken.cgroup.version == 2 else "memory.limit_in_bytes"
    broken.cgroup.files[name] = ["/nonexistent/" + name]
    spec = JobSpec(code="return input * 2", input=21, limits=sandboxed.default_limits, retries=0)
    assert sandboxed.run(spec).result == 42
    assert sandboxed.host is not broken and not broken.alive


def test_threads_left_running_do_not_hold_the_attempt_open(executor):
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nreturn 'returned'"
    outcome = run(executor, code, timeout_s=5)
    assert outcome.result == "returned"
    assert outcome.duration_ms < 3000  # ended when the function returned, not at the 5 s limit


def test_an_attempt_that_waits_for_a_fork_server_is_told(executor):
    """The worker's held-back claim starts then (worker.AttemptWatch), not after the wait."""

    class Told(Watch):
        starts = 0

        def sandbox_starting(self) -> None:
            self.starts += 1

    executor.close()  # no fork server: the next attempt waits for one
    spec = JobSpec(code="return input * 2", input=21, limits=resolve({}, SETTINGS), retries=0)
    first, second = Told(), Told()
    assert executor.run(spec, watch=first).result == 42 and first.starts == 1
    executor.prepare()  # a server and a spare are ready: nothing to wait for
    assert executor.run(spec, watch=second).result == 42 and second.starts == 0
