"""The hostile-program suite: code written to break out, run through real workers and sandboxes.

Tests run as root here, so a destructive program that ran unconfined would really
damage the machine. The `confined` fixture first runs a probe job and checks that
it sees its own PID namespace, no network, no host files and its limits; if not,
every destructive case fails without being run.

Each program returns (or fails with) something that shows the attack did not
work; after the suite, the workers are the same processes, the services are
healthy and no sandbox process is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import uuid

import pytest

from stack import MONGO_PORT, REDIS_PORT, ROOT, Stack, wait_until

SLOT_UIDS = (60000, 60001)
MARKER = f"sless-hostile-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hostile_stack(logs_dir):
    s = Stack(logs_dir, workers=2).start()
    s.first_workers = sorted(s.worker_pids())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def confined(hostile_stack) -> dict:
    """Run the probe; return what it saw. Destructive tests call `require_confinement`."""
    doc = execute(hostile_stack, PROBE)
    assert doc["state"] == "completed", doc
    return doc["result"]


PROBE = textwrap.dedent("""
        import os, resource, socket
        seen = {"pid": os.getpid(), "uid": os.getuid(), "init": "visible" if os.path.exists("/proc/1") else "hidden",
                "interfaces": [name for _, name in socket.if_nameindex()],
                "host_files": [p for p in ("/etc/shadow", "/root", "/home", "/var") if os.path.exists(p)],
                "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0], "as": resource.getrlimit(resource.RLIMIT_AS)[0]}
        try:
            socket.create_connection(("127.0.0.1", %d), timeout=1).close()
            seen["redis"] = "reachable"
        except OSError as e:
            seen["redis"] = type(e).__name__
        return seen
    """ % REDIS_PORT)


def require_confinement(seen: dict) -> None:
    problems = []
    if seen["pid"] > 10 or seen["init"] != "hidden":  # the attempt's own init, which its /proc does not show
        problems.append(f"no PID namespace of its own (pid {seen['pid']}, PID 1 {seen['init']})")
    if seen["uid"] == 0:
        problems.append("runs as root")
    if seen["redis"] == "reachable" or seen["interfaces"] not in (["lo"], []):
        problems.append(f"network visible ({seen['interfaces']}, redis {seen['redis']})")
    if seen["host_files"]:
        problems.append(f"host files visible: {seen['host_files']}")
    if seen["as"] in (-1, resource_infinity()):
        problems.append("no memory limit")
    if problems:
        pytest.fail("refusing to run a destructive program: the probe shows the sandbox is not in force: "
                    + "; ".join(problems))


def resource_infinity() -> int:
    import resource

    return resource.RLIM_INFINITY


def execute(stack: Stack, code: str, **options) -> dict:
    body = {"code": code, "retries": 0, "timeout_s": 3, **options}
    answer = stack.post("/execute", body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_probe_shows_confinement(confined):
    require_confinement(confined)
    assert confined["uid"] == 65534 and confined["redis"] != "reachable"


def test_the_guard_refuses_an_unconfined_worker(make_stack):
    """With --insecure-no-sandbox the (harmless) probe runs unconfined, and the guard says so."""
    insecure = make_stack(workers=1, pool_args=("--insecure-no-sandbox",))
    assert "INSECURE: --insecure-no-sandbox given" in insecure.log("pool")
    probe_doc = execute(insecure, PROBE)
    with pytest.raises(pytest.fail.Exception, match="sandbox is not in force"):
        require_confinement(probe_doc["result"])


# --- the programs ---------------------------------------------------------------------------
# (name, code, check): `check(doc)` asserts the safe outcome. Codes are function bodies or
# modules; `PROJECT`, `REDIS`, `MONGO` and `MARKER` are filled in below.

def refused(doc) -> None:
    """The attack raised inside the sandbox, or the program reported its own failure."""
    if doc["state"] == "failed":
        assert doc["error"]["type"] in ("exception", "crashed", "timeout", "memory", "process_limit"), doc
    else:
        assert doc["result"] in ("refused", False, None, []) or str(doc["result"]).startswith("refused"), doc


def completed_with(expected):
    def check(doc) -> None:
        assert doc["state"] == "completed", doc
        assert doc["result"] == expected, doc

    return check


def killed_nothing_outside(doc) -> None:
    """kill(-1) reaches only the sandbox's own processes (here: none); the final test checks the workers."""
    if doc["state"] == "failed":
        assert doc["error"]["message"].startswith("ProcessLookupError"), doc
    else:
        assert doc["result"] == "still here", doc


def failed_as(*types):
    def check(doc) -> None:
        assert doc["state"] == "failed" and doc["error"]["type"] in types, doc

    return check


def failed_with(kind: str, words: str):
    def check(doc) -> None:
        assert doc["state"] == "failed" and doc["error"]["type"] == kind and words in doc["error"]["message"], doc

    return check


TRY = """
try:
{body}
    return "escaped"
except {errors} as e:
    return "refused: " + type(e).__name__
"""


def attempt(body: str, errors: str = "OSError") -> str:
    """A program that returns "refused: <error>" when the attack fails, "escaped" when it works."""
    return TRY.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "), errors=errors)


SYSCALL = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
result = libc.syscall({number}, {args})
return "refused" if result == -1 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES) else "escaped " + str(result)
"""

PROGRAMS = [
    # network
    ("tcp_to_redis", attempt(f"import socket\nsocket.create_connection(('127.0.0.1', {REDIS_PORT}), timeout=1)"), refused),
    ("tcp_to_mongo", attempt(f"import socket\nsocket.create_connection(('127.0.0.1', {MONGO_PORT}), timeout=1)"), refused),
    ("tcp_ipv6_loopback", attempt(f"import socket\nsocket.create_connection(('::1', {REDIS_PORT}), timeout=1)"), refused),
    ("dns_lookup", attempt("import socket\nsocket.getaddrinfo('localhost', 80) and socket.getaddrinfo('example.com', 80)"), refused),
    ("raw_socket", attempt("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"), refused),
    ("packet_socket", attempt("import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)"), refused),
    ("only_a_private_loopback", "import socket\nreturn [n for _, n in socket.if_nameindex()]", completed_with(["lo"])),
    # filesystem
    ("write_usr", attempt("open('/usr/lib/sless-evil', 'w').write('x')"), refused),
    ("write_root", attempt("open('/sless-evil', 'w').write('x')"), refused),
    ("read_shadow", attempt("return 'escaped: ' + open('/etc/shadow').read()"), refused),
    ("read_project_files", attempt("return 'escaped: ' + open('PROJECT/README.md').read()"), refused),
    ("read_worker_environ", "import os\ntext = ''\nfor p in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                            "    try:\n        text += open(f'/proc/{p}/environ').read()\n"
                            "    except PermissionError:\n        pass\n"
                            "return 'SLESS_' in text or 'REDIS' in text or 'MONGO' in text", completed_with(False)),
    # the namespace's init is the attempt's own (runner.py), in a user namespace above the job's
    ("proc_1_root", "import os\ntry:\n    return sorted(os.listdir('/proc/1/root'))\nexcept OSError:\n"
                    "    return 'denied'", completed_with("denied")),
    # the attempt's init shares the fork server's memory (runner.py): its memory and descriptors stay closed
    ("proc_1_mem_write", attempt("f = open('/proc/1/mem', 'r+b')\nf.seek(4096)\nf.write(b'x')\nreturn 'escaped'"), refused),
    ("proc_1_oom_score_adj", attempt("open('/proc/1/oom_score_adj', 'w').write('1000')\nreturn 'escaped'"), refused),
    ("proc_1_clear_refs", attempt("open('/proc/1/clear_refs', 'w').write('1')\nreturn 'escaped'"), refused),
    ("proc_1_fd_open", attempt("import os\nfds = os.listdir('/proc/1/fd')\nreturn 'escaped ' + str([os.readlink('/proc/1/fd/' + n) for n in fds])"),
     refused),
    ("symlink_to_secret", attempt("import os\nos.symlink('/etc/shadow', '/work/s')\nreturn 'escaped: ' + open('/work/s').read()"), refused),
    ("hardlink_out", attempt("import os\nos.link('/usr/bin/python3', '/work/py')"), refused),
    ("proc_sys_write", attempt("open('/proc/sys/kernel/hostname', 'w').write('evil')"), refused),
    ("raw_disk", attempt("import os\nreturn 'escaped: ' + str(os.listdir('/dev')) + open('/dev/vda', 'rb').read(1).hex()"), refused),
    ("mount_over_tmp", SYSCALL.format(number=165, args="b'none', b'/tmp', b'tmpfs', 0, None"), completed_with("refused")),
    # processes
    ("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", failed_as("timeout", "process_limit", "crashed")),
    ("thread_bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
     failed_as("memory", "process_limit")),
    ("kill_everything", "import os, signal\nos.kill(-1, signal.SIGKILL)\nreturn 'still here'", killed_nothing_outside),
    ("ptrace_init", SYSCALL.format(number=101, args="16, 1, 0, 0"), completed_with("refused")),
    ("setsid_double_fork", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                           "        os.execv('/usr/bin/python3', ['python3', '-c', SLEEPER, 'MARKER-a'])\n    os._exit(0)\nreturn 'left a child'",
     completed_with("left a child")),
    ("outlive_the_job", "import subprocess, signal\nsubprocess.Popen(['/usr/bin/python3', '-c', SLEEPER, 'MARKER-b'], start_new_session=True, "
                        "preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))\nreturn 'spawned'",
     completed_with("spawned")),
    # resources
    ("memory_bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", failed_as("memory")),
    ("cpu_spin_ignoring_signals", "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
                                  "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass", failed_as("timeout")),
    ("fill_dev_shm", attempt("with open('/dev/shm/big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))"), refused),
    ("write_dev", attempt("open('/dev/sless-evil', 'w').write('x')"), refused),
    ("memfd_create", attempt("import os\nos.memfd_create('hoard')"), refused),
    ("sysv_shm", SYSCALL.format(number=29, args="0, 1 << 20, 0o1000 | 0o600"), completed_with("refused")),
    ("vsock", attempt("import socket\nsocket.socket(40, socket.SOCK_STREAM)"), refused),
    ("fill_tmpfs", attempt("with open('/work/big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))"), refused),
    ("fill_tmpfs_unhandled", "for i in range(100):\n    open(f'/work/f{i}', 'wb').write(b'x' * (8 << 20))", failed_as("disk_limit")),
    ("big_file_unhandled", "with open('/work/big', 'wb') as f:\n    f.write(b'x' * (80 << 20))", failed_as("file_size_limit", "memory")),
    ("open_files_unhandled", "files = [open('/dev/null') for _ in range(1000)]", failed_as("open_files_limit")),
    ("output_flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", failed_as("output_limit")),
    ("deep_result", "a = []\nfor _ in range(100000):\n    a = [a]\nreturn a", failed_as("invalid_result")),
    ("huge_result", "return 'x' * (4 << 20)", failed_as("result_limit")),
    # Python-level tricks
    # the runner writes reports with json's C encoder, taken before the code ran: replacing
    # `json.dumps` or `_json.make_encoder` does not reach them, on success or failure
    ("tamper_sys_modules", "import sys, json\njson.dumps = lambda *a, **k: 'forged'\nsys.modules['os'] = None\nreturn 1",
     completed_with(1)),
    ("tamper_json_encoder", "import json, _json\njson.dumps = _json.make_encoder = None\nreturn object()",
     failed_as("invalid_result")),
    # a report forged through the runner's own module is not taken: unreadable, the attempt crashed
    ("forge_report", "import __main__\n__main__.encode_result = lambda *a: 'forged'\nreturn 1",
     failed_with("crashed", "unreadable report")),
    ("tamper_builtins", "import builtins\nbuiltins.open = None\nbuiltins.__import__ = None\nreturn 2", completed_with(2)),
    ("ctypes_unshare", SYSCALL.format(number=272, args="0x10000000"), completed_with("refused")),
    ("ctypes_setns", SYSCALL.format(number=308, args="0, 0"), completed_with("refused")),
    ("ctypes_keyctl", SYSCALL.format(number=250, args="0, 0"), completed_with("refused")),
    ("ctypes_bpf", SYSCALL.format(number=321, args="0, 0, 0"), completed_with("refused")),
    ("ctypes_userfaultfd", SYSCALL.format(number=323, args="0"), completed_with("refused")),
    ("ctypes_io_uring", SYSCALL.format(number=425, args="1, 0"), completed_with("refused")),
    ("ctypes_perf_event_open", SYSCALL.format(number=298, args="0, 0, -1, -1, 0"), completed_with("refused")),
    ("ctypes_clone_newuser", SYSCALL.format(number=56, args="0x10000000 | 17, 0, 0, 0, 0"), completed_with("refused")),
    ("abi_32bit_int80", "import ctypes, mmap\ncode = b'\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3'\n"
                        "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\npage.write(code)\n"
                        "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
                        "return 'escaped ' + str(ctypes.CFUNCTYPE(ctypes.c_int)(address)())", failed_as("crashed")),
    ("os_system_and_subprocess", "import os, subprocess\nrc = os.system('cat /etc/shadow 2>/dev/null')\n"
                                 "who = subprocess.run(['/usr/bin/id', '-u'], capture_output=True, text=True).stdout.strip()\n"
                                 "return [rc != 0, who]", completed_with([True, "65534"])),
    ("import_project", attempt("import sys\nsys.path.insert(0, 'PROJECT')\nimport sless_daemon", "ImportError"), refused),
]


SLEEPER = "'import time; time.sleep(60)'"


def fill(code: str) -> str:
    return code.replace("PROJECT", str(ROOT)).replace("MARKER", MARKER).replace("SLEEPER", SLEEPER)


@pytest.mark.parametrize("name, code, check", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_hostile_program(hostile_stack, confined, name, code, check):
    require_confinement(confined)
    doc = execute(hostile_stack, fill(code), memory_mb=128)
    check(doc)


def test_at_least_thirty_programs():
    assert len(PROGRAMS) >= 30


def test_abstract_unix_socket_of_the_host_is_unreachable(hostile_stack, confined):
    require_confinement(confined)
    name = f"\0{MARKER}-abstract"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)
    try:
        code = attempt(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})")
        refused(execute(hostile_stack, code))
    finally:
        listener.close()


def test_udp_to_a_host_listener_never_arrives(hostile_stack, confined):
    """The sandbox has a loopback of its own: a datagram to 127.0.0.1 never reaches the host's."""
    require_confinement(confined)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        code = f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'{MARKER}', ('127.0.0.1', {port}))\nreturn 'sent'"
        execute(hostile_stack, code)
        with pytest.raises(socket.timeout):
            listener.recvfrom(100)
    finally:
        listener.close()


LEFT_PORT = 47123  # inside the worker sandbox's own loopback: no host port is touched
LISTENER = (f"import socket, time\nu = socket.socket(socket.AF_UNIX)\nu.bind('\\0{MARKER}-left')\nu.listen()\n"
            f"t = socket.socket()\nt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"t.bind(('127.0.0.1', {LEFT_PORT}))\nt.listen()\ntime.sleep(60)")
LISTENERS_UP = f"""
for _ in range(200):
    try:
        socket.create_connection(('127.0.0.1', {LEFT_PORT}), 0.1).close()
        return 'left'
    except OSError:
        time.sleep(0.02)
return 'the listener never came up'
"""
LISTENERS_GONE = f"""
def reachable(family, address):
    try:
        socket.socket(family).connect(address)
        return True
    except OSError:
        return False
gone = not reachable(socket.AF_INET, ('127.0.0.1', {LEFT_PORT})) and not reachable(socket.AF_UNIX, '\\0{MARKER}-left')
"""


def test_nothing_leaks_from_one_job_to_the_next(hostile_stack, confined):
    require_confinement(confined)
    leave = ("import os, subprocess\nopen('/work/leak', 'w').write('x')\nopen('/tmp/leak2', 'w').write('y')\n"
             "os.environ['SLESS_LEAK'] = '1'\nos.putenv('SLESS_LEAK', '1')\n"
             f"subprocess.Popen(['/usr/bin/python3', '-c', {SLEEPER}, '{MARKER}-c'], start_new_session=True)\n"
             "return 'left'")
    look = ("import os\nreturn [os.path.exists('/work/leak'), os.path.exists('/tmp/leak2'), 'SLESS_LEAK' in os.environ, "
            "sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:3], os.listdir('/work')]")
    for _ in range(3):  # two workers: each leaver is followed by a looker on either of them
        assert execute(hostile_stack, leave)["result"] == "left"
        assert execute(hostile_stack, look)["result"] == [False, False, False, [2], []]  # PID 1: hidden


def test_a_listener_left_running_is_gone_for_the_next_job_on_the_same_worker(make_stack, confined):
    """The attempts of one worker share its sandbox's loopback (runner.py): a detached process
    listening there (TCP and an abstract unix socket) must be gone for the next job. One
    worker, so the next job runs where the listener was; the leaver checks its listener
    answers before it returns."""
    require_confinement(confined)
    one = make_stack(workers=1)
    leave = ("import os, socket, subprocess, time\n"
             f"subprocess.Popen(['/usr/bin/python3', '-c', {LISTENER!r}], start_new_session=True)\n" + LISTENERS_UP)
    look = "import socket\n" + LISTENERS_GONE + "return gone"
    for _ in range(2):
        left = execute(one, leave)
        assert left["result"] == "left", left
        after = execute(one, look)
        assert after["result"] is True and after["worker"] == left["worker"], after


def test_an_attempt_that_reports_and_runs_on_is_ended_while_the_queue_stays_empty(make_stack, confined):
    """A job may write its report itself and go on running. The report decides its outcome;
    what still runs gets capture.EXIT_DRAIN_S and then dies with its sandbox, also when no
    next job comes to make the worker read the attempt's status (worker.AttemptRunner.idle)."""
    require_confinement(confined)
    one = make_stack(workers=1)
    runs_on = ("import os, subprocess, time\n"
               f"subprocess.Popen(['/usr/bin/python3', '-c', {SLEEPER}, '{MARKER}-runs-on'], start_new_session=True)\n"
               "os.write(3, b'{\"ok\": true, \"result\": \"reported\"}')\n"
               "os.closerange(0, 4)\ntime.sleep(60)")
    doc = execute(one, runs_on, timeout_s=30)
    assert doc["state"] == "completed" and doc["result"] == "reported", doc

    def running_on() -> str:
        return subprocess.run(["pgrep", "-a", "-f", f"{MARKER}-runs-on"], capture_output=True, text=True).stdout

    wait_until(lambda: not running_on(), 5, "what the attempt left running outlived its report with no job after it")


def test_a_bomb_leaves_the_job_beside_it_unharmed(hostile_stack, confined):
    require_confinement(confined)
    neighbour = ("import subprocess, hashlib\nouts = [subprocess.run(['/usr/bin/echo', str(i)], capture_output=True, "
                 "text=True).stdout for i in range(20)]\nblob = bytearray(64 << 20)\n"
                 "return [len(outs), hashlib.sha256(bytes(blob[:1024])).hexdigest()[:8]]")
    bombs = ["import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
             "import os\nfor _ in range(30):\n    if os.fork() == 0:\n        break\nchunks = []\n"
             "while True:\n    chunks.append(bytearray(8 << 20))"]
    for bomb in bombs:  # one worker holds the bomb while the other runs the neighbour
        bomb_id = hostile_stack.submit({"code": bomb, "timeout_s": 4, "retries": 0, "memory_mb": 512})
        wait_until(lambda: hostile_stack.get(f"/status/{bomb_id}").json()["state"] == "running", 10, "bomb not running")
        doc = execute(hostile_stack, neighbour, timeout_s=10, memory_mb=256)
        assert doc["state"] == "completed" and doc["result"] == [20, "5f70bf18"], doc
        assert hostile_stack.wait_terminal(bomb_id)["state"] == "failed"


def command_line(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def exited(pid: int) -> bool:
    """A zombie: it has ended and waits for its parent to collect it."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def ancestors(pid: int) -> list[int]:
    chain = []
    try:
        while pid > 1:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            chain.append(pid)
    except (OSError, ValueError, IndexError):
        pass
    return chain


def test_zz_after_the_suite_everything_is_healthy_and_nothing_lingers(hostile_stack):
    """Runs last in this file: same workers, healthy services, no sandbox process left."""
    health = hostile_stack.get("/health").json()
    assert health["status"] == "ok" and health["queue"]["live_workers"] == 2, health
    assert sorted(hostile_stack.worker_pids()) == hostile_stack.first_workers, "a worker died during the suite"
    assert hostile_stack.pool.poll() is None and hostile_stack.daemon.poll() is None
    assert execute(hostile_stack, "return input * 2;", input=21)["result"] == 42

    def leftovers() -> list[str]:
        """Hostile processes, and anything below our workers but their idle spare sandboxes."""
        marked = subprocess.run(["pgrep", "-a", "-f", MARKER], capture_output=True, text=True).stdout.splitlines()
        ours = [pid for pid in all_pids() if workers & set(ancestors(pid)) and not exited(pid)]
        commands = [command_line(pid) for pid in ours]
        extra = [c for c in commands if not (c.startswith("bwrap") or "/sless/runner.py" in c)]
        spares = len(commands) - len(extra)
        # per idle worker: bubblewrap's two, the fork server, and the spare attempt's three (runner.py)
        return marked + extra + ([f"{spares} spare processes"] if spares > 6 * len(workers) else [])

    workers = set(hostile_stack.worker_pids())
    try:
        wait_until(lambda: not leftovers(), 5, "processes of the hostile programs are still running")
    except AssertionError:
        raise AssertionError(f"left running: {leftovers()}") from None
    table = subprocess.run(["ps", "-eo", "ppid=,stat=,cmd="], capture_output=True, text=True).stdout.splitlines()
    zombies = [line for line in table if int(line.split()[0]) in workers and line.split()[1].startswith("Z")]
    # The sandbox's init can exit just after the worker reaped the attempt; the worker
    # collects it after its next attempt. More than one per worker would be a leak.
    assert len(zombies) <= len(workers), f"workers left unreaped sandbox processes: {zombies}"
    redis_ok = hostile_stack.redis().ping()
    mongo_ok = hostile_stack.mongo_jobs().database.command("ping")["ok"] == 1
    assert redis_ok and mongo_ok
    assert json.loads(hostile_stack.cli("health", "--json").stdout)["healthy"] is True
