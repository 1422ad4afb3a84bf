"""Runs one job's code inside the sandbox and reports its outcome as JSON.

This file is executed as a script by a fresh interpreter (`python -I -S runner.py FD`)
and must import nothing but the standard library: the project is not on its path.

Protocol: a JSON request {"code", "input", "entry", "context"} arrives on stdin; exactly one
JSON report goes to descriptor FD, either {"ok": true, "result": ...} or
{"ok": false, "error": {"type", "message"}}. The user's prints go to the real
stdout and stderr, which the executor captures. JSON only, never pickle.
"""

import _ast  # the C module behind `ast`: same nodes, none of ast.py's import cost
import json
import os
import sys

DEFAULT_ENTRY = "main"
BODY_FUNCTION = "__sless_function__"


def main() -> None:
    report_fd = int(sys.argv[1])
    max_result_bytes = int(sys.argv[2])
    # Opened before user code runs, so code that breaks builtins or imports cannot stop the report.
    out = os.fdopen(report_fd, "w", encoding="utf-8")
    request = json.loads(sys.stdin.buffer.read())
    _detach_stdin()
    report = run(request["code"], request["input"], request.get("entry"), request.get("context"), max_result_bytes)
    sys.stdout.flush()
    sys.stderr.flush()
    out.write(report)
    out.close()
    os._exit(0)  # the function is done: threads or handlers it left behind do not hold the attempt open


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
    module = parse(f"def {BODY_FUNCTION}(input, context=None):\n    pass\n")
    if tree.body:
        module.body[0].body = tree.body
    namespace = {"__name__": "__sless__"}
    exec(compile(module, "<function>", "exec"), namespace)
    return namespace[BODY_FUNCTION]


def encode_result(result, max_result_bytes: int) -> str:
    """The success report, or a failure when the result is not JSON or too large."""
    try:
        encoded = json.dumps({"ok": True, "result": result}, allow_nan=False)
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
    return json.dumps({"ok": False, "error": {"type": kind, "message": message}})


def _detach_stdin() -> None:
    """Give user code an empty stdin, so it cannot read the request stream."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


if __name__ == "__main__":
    main()
