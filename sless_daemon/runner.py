"""Runs jobs' code inside the sandbox: a fork server whose every attempt gets a fresh sandbox.

Started once per worker sandbox (`python -I -S -B runner.py CONTROL_FD [--plain]`) and
executed as a script, it must import nothing but the standard library: the project is
not on its path. It never runs user code and never sees a request; it only forks.

Per attempt (SOCK-style, USENIX ATC 2018): the server starts a new PID namespace whose
PID 1 is an init that shares the server's memory and only waits (start_attempt), and
forks the job into it as PID 2; the job starts a session of its own, enters new mount
and IPC namespaces, mounts a fresh /proc (showing only its own processes), /work
(size-capped tmpfs) and /dev/shm, enters a new user namespace where it is uid 65534
and owns none of those namespaces, drops every capability, takes the job's rlimits and
seccomp filter, and only then reads its request from stdin. The
network (loopback only) and UTS namespaces are the worker sandbox's, made by bubblewrap
and shared by the attempts of that one worker, which run one after another: an attempt
cannot configure them (its user namespace owns neither), and every process it started
is gone before the next attempt is sent its request, so it leaves nothing in them for
the next. So no state crosses attempts, and the interpreter's start-up is paid once
per worker instead of once per job. `--plain` (insecure workers) skips the
namespaces and the filter: it only forks, changes directory and sets rlimits.

Control protocol (CONTROL_FD is a SOCK_SEQPACKET socket to the worker, JSON messages):
- server -> worker `{"ready": true}` once it can take attempts;
- worker -> server one order per attempt, `{"rlimits": [[resource, soft, hard]...],
  "tmpfs_bytes", "result_bytes", "workdir"}`, carrying four descriptors: the request
  to read (stdin), stdout, stderr and the report pipe;
- server -> worker `{"status": N}` when the attempt's whole process tree has ended
  (the job's exit code, or -signal when a signal ended it).

The attempt reads `{"code", "input", "entry", "context"}` on stdin and writes exactly
one JSON report to descriptor 3: `{"ok": true, "result": ...}` or `{"ok": false,
"error": {"type", "message"}}`. JSON only, never pickle.
"""

import _ast  # the C module behind `ast`: same nodes, none of ast.py's import cost
import _json  # the C encoder behind `json.dumps`, called without its Python layers (_dumps)
import _signal  # the C module behind `signal`: the same calls, without making an enum of every signal
import ctypes
import fcntl
import gc
import json
import os
import resource
import socket
import sys
import time

DEFAULT_ENTRY = "main"
BODY_FUNCTION = "__sless_function__"
REPORT_FD = 3
SETUP_FAILED = 125  # the attempt's sandbox could not be set up: the worker reports a crash
SECCOMP_PATH = "/sless/seccomp.bpf"
INSIDE_UID = 65534  # "nobody": what the job's code runs as
WORKDIR = "/work"
SHM_OPTIONS = b"size=4194304,mode=1777"

CLONE_VM, CLONE_FILES = 0x00000100, 0x00000400
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAP_AMBIENT = 24, 38, 22, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER, LINUX_CAPABILITY_VERSION_3 = 4, 2, 0x20080522
CAP_LAST_POSSIBLE = 63

_libc = ctypes.CDLL(None, use_errno=True)
# Looked up here, in the server: ctypes makes a function object on first use, and in an
# attempt (a fork) that would be done again, writing to pages shared with the server.
_unshare, _setns, _mount, _prctl, _capset = _libc.unshare, _libc.setns, _libc.mount, _libc.prctl, _libc.capset
_clone = _libc.clone
_clone.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_PAUSE = ctypes.cast(_libc.pause, ctypes.c_void_p)
_INIT_STACK = ctypes.create_string_buffer(1 << 16)  # the init's stack: pause() needs little
_INIT_STACK_TOP = (ctypes.addressof(_INIT_STACK) + len(_INIT_STACK)) & ~15
_ALL_SIGNALS = _signal.valid_signals()  # the init's mask, built once: it is set for every attempt


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    plain = "--plain" in sys.argv[2:]
    seccomp = None if plain else seccomp_program(_read(SECCOMP_PATH))
    own_pid_ns = None if plain else os.open("/proc/self/ns/pid", os.O_RDONLY)
    gc.freeze()  # what is here now is shared by every fork, not copied page by page
    control.send(b'{"ready": true}')
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 4)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # the worker is gone
        order = json.loads(message)  # the worker's, not the job's: parsed once, before the fork
        init, pid = start_attempt(own_pid_ns)
        if pid == 0:
            control.close()
            attempt(order, fds, plain, seccomp)
        for fd in fds:
            os.close(fd)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if init:
            end_namespace(init)
        try:
            control.send(b'{"status": %d}' % status)
        except OSError:
            os._exit(0)  # the worker is gone (it may leave an attempt's status unread: collect_ended)


def start_attempt(own_pid_ns) -> tuple[int, int]:
    """Start an attempt's two processes in a new PID namespace: (init's pid, job's pid).

    The init, PID 1, only holds the namespace open and reaps orphans: a clone of this
    server that shares its memory and descriptor table (nothing copied, nothing to
    tear down) and sleeps in pause() with the signals blocked and SIGCHLD ignored (so
    the kernel reaps the children it inherits); as PID 1 it is also deaf to any signal
    without a handler sent from inside its namespace. Only SIGKILL, sent by this server
    once the job has ended (end_namespace), ends it, and with it every process left in
    the namespace. The job, PID 2, is a fork of this server; the /proc it mounts does
    not show PID 1, whose address space is this server's. unshare(CLONE_NEWPID) only
    places the server's next children in the new namespace and works once until setns()
    points them back at the server's own. With `--plain`: no namespace, no init, one fork.
    """
    if own_pid_ns is None:
        return 0, os.fork()
    _check(_unshare(CLONE_NEWPID), "unshare PID namespace")
    init = pid = -1
    try:
        init = _start_init()
        pid = os.fork()
    finally:
        if pid != 0:  # in the server (the job keeps the new namespace for its own children)
            _check(_setns(own_pid_ns, CLONE_NEWPID), "setns back to the server's PID namespace")
            if pid < 0 < init:  # the fork failed: the init has no job to wait for
                end_namespace(init)
    return init, pid


def end_namespace(init: int) -> None:
    """Kill the attempt's init, and with it every process left in its namespace; return when all are gone.

    The init's end waits until every process of the namespace is reaped, and a job's
    clone(CLONE_PARENT) child is this server's: so reap whatever ends until the init does.
    """
    os.kill(init, _signal.SIGKILL)
    while os.waitpid(-1, 0)[0] != init:
        pass


def _start_init() -> int:
    """Clone the namespace's init (see start_attempt): pause() on its own small stack.

    Through `_signal`: `signal.pthread_sigmask` turns each of the 64 signals of the mask it
    returns into an enum, 30 us per call, twice per attempt.
    """
    blocked = _signal.pthread_sigmask(_signal.SIG_SETMASK, _ALL_SIGNALS)
    reaping = _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # copied into the init's handler table only
    try:
        pid = _clone(_PAUSE, _INIT_STACK_TOP, CLONE_VM | CLONE_FILES | _signal.SIGCHLD, None)
    finally:
        _signal.signal(_signal.SIGCHLD, reaping)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)
    if pid < 0:
        _check(pid, "clone the attempt's init")
    return pid


def attempt(order: dict, fds: list, plain: bool, seccomp) -> None:
    """In the forked child: build the attempt's sandbox, run the job, never return."""
    try:
        _take_descriptors(fds)  # first: a setup failure below is reported on the attempt's stderr
        if not plain:
            os.setsid()  # a session of its own: a fresh scheduler autogroup, whose nice the job may raise
            _write("/proc/self/oom_score_adj", "1000")  # if memory runs out, the job goes first
            _check(_unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")  # already PID 2 of its own PID namespace
            _mount_fresh_filesystems(order["tmpfs_bytes"])
            _become_nobody()
        os.chdir(order.get("workdir") or WORKDIR)
        for which, soft, hard in order["rlimits"]:
            resource.setrlimit(which, (soft, hard))
        if not plain:
            _drop_capabilities()
            _load_seccomp(seccomp)
    except BaseException as e:  # noqa: BLE001 - anything here is a sandbox fault, reported as such
        os.write(2, f"sless: the attempt's sandbox could not be set up: {e}\n".encode())
        os._exit(SETUP_FAILED)
    run_request(order["result_bytes"])


def run_request(max_result_bytes: int) -> None:
    """Read the request, run the code, write the report, and end the attempt's process."""
    # Bound before user code runs, so code that breaks builtins or imports cannot stop the report.
    write, exit_now, now, flush_out, flush_err = os.write, os._exit, time.time, sys.stdout.flush, sys.stderr.flush
    close_pipes = os.closerange
    made = now()  # its sandbox is set up: it waits for its request from here
    request, _ = _SCAN_JSON(_read_all(0).decode(), 0)  # the worker's JSON: no whitespace around it
    _detach_stdin()
    gc.unfreeze()
    started = now()
    report = run(request["code"], request["input"], request.get("entry"), request.get("context"), max_result_bytes)
    # when the code ran, and when its sandbox was made: for the stages
    report = report[:-1] + f', "times": [{started!r}, {now()!r}, {made!r}]}}'
    flush_out()
    flush_err()
    data = report.encode()
    while data:
        data = data[write(REPORT_FD, data):]
    close_pipes(1, REPORT_FD + 1)  # the worker sees the end now, not after the kernel unmaps this process
    exit_now(0)  # the function is done: threads or handlers it left behind do not hold the attempt open


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def run(code: str, value, entry, context, max_result_bytes: int) -> str:
    """Load the code, call its function with the input (and context), and encode the report."""
    try:
        function = load_function(code, entry)
    except SyntaxError as e:
        return failure("syntax", f"{type(e).__name__}: {e.msg} (line {e.lineno})")
    except LookupError as e:
        return failure("entry", str(e.args[0]))
    except MemoryError:
        return failure("memory", "The memory limit was reached while loading the code.")
    except BaseException as e:  # noqa: BLE001 - user code at module level may raise anything
        return exception_failure(e)
    try:
        result = call(function, value, context)
    except MemoryError:
        return failure("memory", "The memory limit was reached (MemoryError).")
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are user errors too
        return exception_failure(e)
    return encode_result(result, max_result_bytes)


def load_function(code: str, entry):
    """Return the callable to run.

    A module that defines `entry` (default `main`) is executed and that function
    returned; anything else is taken as the body of a function of `input`, the form
    of the prototype's example (`return input * 2;`).
    """
    tree = parse(code)
    wanted = entry or DEFAULT_ENTRY
    defines_entry = any(
        isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)) and node.name == wanted for node in tree.body
    )
    if entry or defines_entry:
        namespace = {"__name__": "__sless__"}
        exec(compile(tree, "<function>", "exec"), namespace)
        function = namespace.get(wanted)
        if not callable(function):
            raise LookupError(f"The code defines no function named {wanted!r}.")
        return function
    return compile_body(tree)


def call(function, value, context):
    """Call f(input), or f(input, context) when the function takes a second parameter.

    The context is a dict: job_id, attempt, max_attempts, timeout_s.
    """
    try:
        wants_context = function.__code__.co_argcount >= 2
    except AttributeError:
        wants_context = False
    return function(value, context) if wants_context else function(value)


def parse(source: str):
    """The syntax tree of `source` (what ast.parse does)."""
    return compile(source, "<function>", "exec", _ast.PyCF_ONLY_AST)


def compile_body(tree):
    """Wrap a module's statements as the body of `def f(input, context): ...` and return f."""
    module = _WRAPPER  # built once in the server; each attempt (a fork of it) fills it once
    module.body[0].body = tree.body or _WRAPPER_PASS
    namespace = {"__name__": "__sless__"}
    exec(compile(module, "<function>", "exec"), namespace)
    return namespace[BODY_FUNCTION]


# Built in the server, where they cost nothing per attempt: in an attempt (a fork) every
# object a Python layer touches is a page copied. The wrapper's source is ours, not a job's.
_WRAPPER = parse(f"def {BODY_FUNCTION}(input, context=None):\n    pass\n")
_WRAPPER_PASS = _WRAPPER.body[0].body
_SCAN_JSON = json.decoder.JSONDecoder().scan_once  # the C scanner json.loads ends in
# json's C encoder, taken before any job's code runs: replacing `json.dumps` or
# `_json.make_encoder` from a job does not change how its report is written
_MAKE_ENCODER, _ENCODE_ASCII = _json.make_encoder, _json.encode_basestring_ascii


def _not_json(value):
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")  # JSONEncoder.default's


def _dumps(value) -> str:
    """`json.dumps(value, allow_nan=False)`, through the C encoder it builds per call
    (json.encoder.JSONEncoder.iterencode), without the Python layers around it, which
    cost an attempt 0.1-0.16 ms of first-touch page copies."""
    return "".join(_MAKE_ENCODER({}, _not_json, _ENCODE_ASCII, None, ": ", ", ", False, False, False)(value, 0))


def encode_result(result, max_result_bytes: int) -> str:
    """The success report, or a failure when the result is not JSON or too large."""
    try:
        encoded = '{"ok": true, "result": ' + _dumps(result) + "}"
    except (TypeError, ValueError, RecursionError) as e:
        return failure("invalid_result", f"The result is not JSON-serialisable: {e}.")
    if len(encoded) > max_result_bytes:
        return failure("result_limit", f"The result is {len(encoded)} bytes of JSON; the limit is {max_result_bytes}.")
    return encoded


# Limits the kernel enforces by failing a call: an exception the code did not handle
# because a limit was reached is reported as that limit's breach.
LIMIT_ERRNOS = {24: "open_files_limit", 27: "file_size_limit", 28: "disk_limit", 11: "process_limit"}


def exception_failure(error: BaseException) -> str:
    """Print the traceback (user frames only) to the job's stderr and report its summary."""
    import traceback  # only on failure: it costs milliseconds of start-up

    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next
    traceback.print_exception(type(error), error, frames)
    message = "".join(traceback.format_exception_only(type(error), error)).strip()
    return failure(breach_of(error), message[:2000])


def breach_of(error: BaseException) -> str:
    """The error type: a limit's own (open files, file size, disk, processes) or "exception"."""
    if isinstance(error, OSError) and error.errno in LIMIT_ERRNOS:
        return LIMIT_ERRNOS[error.errno]
    if isinstance(error, RuntimeError) and "can't start new thread" in str(error):
        return "process_limit"
    return "exception"


def failure(kind: str, message: str) -> str:
    return _dumps({"ok": False, "error": {"type": kind, "message": message}})


def _detach_stdin() -> None:
    """Give user code an empty stdin, so it cannot read the request stream."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


# --- building an attempt's sandbox (in the forked children) ---------------------------------

def _mount_fresh_filesystems(tmpfs_bytes: int) -> None:
    """This attempt's own /proc (its PID namespace only), /work and /dev/shm."""
    _check(_mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    # hidepid: the job's /proc shows only processes it could ptrace, so not PID 1, whose
    # address space is the fork server's (oom_score_adj, clear_refs: owner-writable files)
    _check(_mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=invisible"),
           "mount /proc")
    size = f"size={tmpfs_bytes},mode=0755,uid=0,gid=0".encode()
    _check(_mount(b"tmpfs", WORKDIR.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size), "mount /work")
    _check(_mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, SHM_OPTIONS),
           "mount /dev/shm")


def _become_nobody() -> None:
    """Enter a new user namespace as uid/gid 65534, mapped to the sandbox's root.

    That namespace owns none of the attempt's other namespaces, so even its
    capabilities (dropped next) could not mount or configure anything.
    """
    _check(_unshare(CLONE_NEWUSER), "unshare user namespace")
    _write("/proc/self/uid_map", f"{INSIDE_UID} 0 1\n")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/gid_map", f"{INSIDE_UID} 0 1\n")
    os.setresgid(INSIDE_UID, INSIDE_UID, INSIDE_UID)
    os.setresuid(INSIDE_UID, INSIDE_UID, INSIDE_UID)


def _take_descriptors(fds: list) -> None:
    """Make the order's descriptors 0, 1, 2 and 3 and close every other one."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in fds]  # above 0-3 first: no dup2 below hits another
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(REPORT_FD + 1, 1 << 16)


# Built once in the server, so each attempt only makes the calls (ctypes builds a type on
# first use; in a forked attempt every object it touches is a page copied).
_CAP_HEADER = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
_CAP_DATA = (ctypes.c_uint32 * 6)()


def _drop_capabilities() -> None:
    for cap in range(CAP_LAST_POSSIBLE + 1):
        _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last cap: fine
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(_capset(_CAP_HEADER, _CAP_DATA), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_program(bpf: bytes):
    """The filter as prctl takes it (a sock_fprog and the buffer it points to), built in the server."""
    program = ctypes.create_string_buffer(bpf, len(bpf))
    return _SockFprog(len(bpf) // 8, ctypes.addressof(program)), program


def _load_seccomp(program) -> None:
    """Install the job's filter (stacked on the server's own, which bubblewrap loaded)."""
    fprog, _ = program
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
