"""Pure logic: request validation, settings, retry rules, status shape. No services."""

from __future__ import annotations

from pathlib import Path

import pytest

from sless_daemon.errors import BadRequest, ConfigError
from sless_daemon.lifecycle import decide_after_failure, retry_delay_s
from sless_daemon.settings import Settings, describe
from sless_daemon.spec import parse_body, parse_job
from sless_daemon.states import ErrorType, JobState
from sless_daemon.status import status_document

SETTINGS = Settings.from_env({})


def test_defaults_from_the_issue():
    assert (SETTINGS.default_timeout_s, SETTINGS.default_memory_mb, SETTINGS.default_retries) == (5.0, 256, 2)
    assert SETTINGS.max_body_bytes == 1 << 20


def test_prototype_body_parses_with_defaults():
    spec = parse_job(parse_body(b'{"code": "return input * 2;", "input": 21}'), SETTINGS)
    assert (spec.code, spec.input, spec.timeout_s, spec.memory_mb, spec.retries, spec.entry) == (
        "return input * 2;", 21, 5.0, 256, 2, None)


def test_limits_are_checked_against_the_settings():
    tight = SETTINGS.replace(max_timeout_s=10)
    with pytest.raises(BadRequest, match="between 0.1 and 10"):
        parse_job({"code": "x", "timeout_s": 11}, tight)
    assert parse_job({"code": "x", "timeout_s": 10, "memory_mb": 64.0}, tight).memory_mb == 64


def test_settings_reject_bad_values_with_a_sentence():
    with pytest.raises(ConfigError, match="SLESS_PORT=0 is out of range"):
        Settings.from_env({"SLESS_PORT": "0"})
    with pytest.raises(ConfigError, match="must not exceed"):
        Settings.from_env({"SLESS_DEFAULT_TIMEOUT_S": "20", "SLESS_MAX_TIMEOUT_S": "10"})
    with pytest.raises(ConfigError, match="SLESS_LOG_FORMAT"):
        Settings.from_env({"SLESS_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="SLESS_CLAIM_HOLD_S must be at most a fifth of SLESS_LEASE_S"):
        Settings.from_env({"SLESS_CLAIM_HOLD_S": "2.5"})  # the sweep would send its message again meanwhile
    assert Settings.from_env({"SLESS_PORT": "3100"}).port == 3100
    assert all(doc for _, _, doc in describe())


def test_settings_round_trip_through_the_environment():
    custom = SETTINGS.replace(port=4000, api_token="t", retry_backoff_s=0.5)
    assert Settings.from_env(custom.to_env()) == custom


def test_exponential_backoff_is_capped():
    assert [retry_delay_s(a, 1.0, 5.0) for a in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_which_failures_are_retried():
    assert decide_after_failure(1, 3, ErrorType.EXCEPTION, SETTINGS).retry
    assert decide_after_failure(1, 3, ErrorType.WORKER_LOST, SETTINGS).retry
    assert decide_after_failure(2, 3, ErrorType.TIMEOUT, SETTINGS).delay_s == 2.0
    assert not decide_after_failure(3, 3, ErrorType.EXCEPTION, SETTINGS).retry
    for kind in (ErrorType.SYNTAX, ErrorType.ENTRY, ErrorType.INVALID_RESULT, ErrorType.RESULT_LIMIT):
        assert not decide_after_failure(1, 3, kind, SETTINGS).retry


def test_states_are_plain_strings():
    assert JobState.COMPLETED == "completed" and JobState.FAILED.is_terminal and not JobState.RUNNING.is_terminal


def test_status_document_decodes_json_fields():
    doc = status_document({"_id": "a" * 32, "state": "completed", "result_json": "[1, {\"b\": null}]",
                           "attempts": 1, "retries": 2})
    assert doc["jobId"] == "a" * 32 and doc["result"] == [1, {"b": None}] and doc["max_attempts"] == 3


def test_sandbox_command_has_every_layer():
    from sless_daemon.sandbox import Sandbox, sandbox_command

    sandbox = Sandbox("/usr/bin/bwrap", "/usr/bin/python3.11", (), b"", b"", 60000, None)
    command = sandbox_command(sandbox, runner_fd=5, server_seccomp_fd=6, attempt_seccomp_fd=7, control_fd=8)
    text = " ".join(command)
    for flag in ("--unshare-all", "--unshare-user", "--unshare-cgroup", "--die-with-parent", "--new-session",
                 "--clearenv", "--proc /proc", "--dev /dev", "--seccomp 6", "--ro-bind-data 7 /sless/seccomp.bpf",
                 "--ro-bind /usr /usr", "--remount-ro /", "--ro-bind-data 5 /sless/runner.py"):
        assert flag in text, flag
    assert "--share-net" not in text and "--bind / " not in text
    assert command[command.index("--") + 1:] == ["/usr/bin/python3.11", "-I", "-S", "-B", "/sless/runner.py", "8"]
    assert [k for k in command[command.index("--clearenv"):] if k.startswith("SLESS")] == []


def test_every_attempt_enters_fresh_namespaces_as_nobody():
    """The fork server's per-attempt steps (runner.py), beyond what bubblewrap gave the server."""
    from sless_daemon import runner

    source = Path(runner.__file__).read_text()
    fork = source[source.index("def start_attempt("):source.index("def attempt(")]
    assert (fork.index("_unshare(CLONE_NEWPID)") < fork.index("init = _start_init()") < fork.index("pid = os.fork()")
            < fork.index("_setns("))
    steps = source[source.index("def attempt("):source.index("def run_request(")]
    for step in ("CLONE_NEWNS | CLONE_NEWIPC", "_mount_fresh_filesystems",
                 "_become_nobody", "_drop_capabilities", "_load_seccomp", "setrlimit"):
        assert step in steps, step
    assert steps.index("_load_seccomp(") < steps.index("run_request("), "user code must start after the filter"


def test_the_server_filter_differs_from_the_attempts_only_by_namespaces_and_mounts():
    from sless_daemon.seccomp_policy import SERVER_ALLOWED, build_filter_bpf

    assert SERVER_ALLOWED == {"unshare", "mount", "setns"}
    assert build_filter_bpf(SERVER_ALLOWED) != build_filter_bpf()


def test_seccomp_filter_compiles():
    from sless_daemon.seccomp_policy import build_filter_bpf

    bpf = build_filter_bpf()
    assert len(bpf) % 8 == 0 and len(bpf) > 200  # classic BPF: 8-byte instructions
