"""The `sless` command against a real daemon: output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sless.exit_codes import ExitStatus
from stack import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_submit_wait_prints_the_result(stack):
    done = stack.cli("submit", str(EXAMPLES / "double.py"), "--input", "21", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_submit_prints_the_id_then_status_shows_the_result(stack):
    done = stack.cli("submit", str(EXAMPLES / "greet.py"), "--input", '{"name": "Bo"}')
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    stack.wait_terminal(job_id)
    shown = stack.cli("status", job_id)
    assert shown.returncode == 0
    assert "completed" in shown.stdout and "Hello, Bo!" in shown.stdout
    as_json = json.loads(stack.cli("status", job_id, "--json").stdout)
    assert as_json["result"] == {"greeting": "Hello, Bo!", "length": 2}


def test_status_shows_a_result_that_looks_like_markup_as_it_is(stack):
    """A result is the job's data: rich must not read "[/x]" or "[bold]" in it as markup."""
    job_id = stack.submit({"code": 'return {"a": "[/x]", "b": "[bold]not bold[/bold]"}'})
    stack.wait_terminal(job_id)
    shown = stack.cli("status", job_id)
    assert shown.returncode == 0, shown.stderr
    assert '"[/x]"' in shown.stdout and "[bold]not bold[/bold]" in shown.stdout


def test_submit_json_and_options(stack, tmp_path):
    (tmp_path / "in.json").write_text('{"name": "Cy", "times": 3}')
    done = stack.cli("submit", str(EXAMPLES / "greet.py"), "--input-file", str(tmp_path / "in.json"),
                     "--timeout", "2", "--memory", "128", "--retries", "0", "--json")
    answer = json.loads(done.stdout)
    assert answer["status"] == "submitted"
    doc = stack.wait_terminal(answer["jobId"])
    assert {k: doc["limits"][k] for k in ("timeout_s", "memory_mb", "retries", "cpu_s")} == {
        "timeout_s": 2.0, "memory_mb": 128, "retries": 0, "cpu_s": 3.0}
    assert doc["result"]["greeting"].count("Cy") == 3


def test_other_limits_with_limit_option(stack):
    code = "import resource\nreturn resource.getrlimit(resource.RLIMIT_NOFILE)[0]"
    done = stack.cli("submit", "-", "--limit", "open_files=20", "--limit", "processes=8", "--wait", input=code)
    assert done.returncode == 0 and done.stdout.strip() == "20"
    bad = stack.cli("submit", "-", "--limit", "open_files", input=code)
    assert bad.returncode == ExitStatus.USAGE and "NAME=VALUE" in bad.stderr
    unknown = stack.cli("submit", "-", "--limit", "gpus=2", input=code)
    assert unknown.returncode == ExitStatus.REJECTED and "Unknown field 'gpus'" in unknown.stderr


def test_input_that_is_not_json_is_a_string(stack):
    done = stack.cli("submit", "-", "--input", "hello there", "--wait", input="return input.upper()")
    assert done.stdout.strip() == '"HELLO THERE"'


def test_entry_option(stack, tmp_path):
    (tmp_path / "fn.py").write_text("def handler(x):\n    return x * 3\n")
    done = stack.cli("submit", str(tmp_path / "fn.py"), "--entry", "handler", "--input", "2", "--wait")
    assert done.stdout.strip() == "6"


def test_failed_job_exits_non_zero_with_the_error(stack):
    done = stack.cli("submit", str(EXAMPLES / "fail.py"), "--input", "1", "--retries", "0", "--wait")
    assert done.returncode == ExitStatus.JOB_FAILED
    assert "exception: ValueError: cannot handle input 1" in done.stderr
    job = stack.cli("submit", str(EXAMPLES / "slow.py"), "--input", "5", "--timeout", "0.5", "--retries", "0",
                    "--wait", "--json")
    assert job.returncode == ExitStatus.JOB_FAILED
    assert json.loads(job.stdout)["error"]["type"] == "timeout"


def test_status_watch_piped_prints_plain_lines_until_the_end(stack):
    job_id = stack.submit({"code": "import time; time.sleep(0.6); return 'ok'"})
    watched = stack.cli("status", job_id, "--watch")
    assert watched.returncode == 0
    assert job_id in watched.stderr and "completed" in watched.stderr
    assert '"ok"' in watched.stdout and "\x1b[" not in watched.stderr


def test_status_watch_of_a_failing_job_exits_1(stack):
    job_id = stack.submit({"code": "raise KeyError('k')", "retries": 0})
    watched = stack.cli("status", job_id, "--watch", "--json")
    assert watched.returncode == ExitStatus.JOB_FAILED
    assert json.loads(watched.stdout.splitlines()[-1])["error"]["type"] == "exception"


def test_unknown_id_exits_4_with_one_sentence(stack):
    done = stack.cli("status", "0" * 32)
    assert done.returncode == ExitStatus.NOT_FOUND
    assert "No job has the id" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_flags_and_missing_arguments_exit_2_with_the_usage(stack):
    """Click's usage errors, whichever copy of Click Typer raises them from (Typer 0.2x
    vendors its own): exit 2 and the usage line, never "unexpected" (10)."""
    for args in (["submit"], ["status", "--bogus", "x"], ["list", "--limit", "abc"], []):
        done = stack.cli(*args)
        assert done.returncode == ExitStatus.USAGE, (args, done.stdout, done.stderr)
        assert "Usage: sless" in done.stdout + done.stderr and "unexpected" not in done.stderr, done.stderr


def test_version_is_printed_without_a_command(stack):
    done = stack.cli("--version")
    assert done.returncode == 0 and re.fullmatch(r"sless \S+\n", done.stdout), done.stdout + done.stderr


def test_unreachable_daemon_exits_3(stack):
    done = stack.cli("status", "0" * 32, env={"SLESS_URL": f"http://127.0.0.1:{free_port()}"})
    assert done.returncode == ExitStatus.UNREACHABLE
    assert "Cannot reach the daemon" in done.stderr and "Traceback" not in done.stderr


def test_unreadable_file_exits_7(stack, tmp_path):
    done = stack.cli("submit", str(tmp_path / "missing.py"))
    assert done.returncode == ExitStatus.FILE_ERROR
    assert "Cannot read the code file" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "bad.json").write_text("{nope")
    done = stack.cli("submit", str(EXAMPLES / "double.py"), "--input-file", str(tmp_path / "bad.json"))
    assert done.returncode == ExitStatus.FILE_ERROR and "not valid JSON" in done.stderr


def test_rejected_submission_exits_5(stack):
    done = stack.cli("submit", "-", "--timeout", "99999", input="return 1")
    assert done.returncode == ExitStatus.REJECTED
    assert "'timeout_s' must be between" in done.stderr


def test_health_table_and_json(stack):
    table = stack.cli("health")
    assert table.returncode == 0, table.stdout + table.stderr
    for word in ("daemon", "redis", "mongodb", "queue depth", "live workers", "ms"):
        assert word in table.stdout
    report = json.loads(stack.cli("health", "--json").stdout)
    assert report["healthy"] is True and report["queue"]["live_workers"] == 2


def test_health_exits_6_when_a_dependency_is_down(make_stack):
    s = make_stack(workers=0, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    done = s.cli("health")
    assert done.returncode == ExitStatus.UNAVAILABLE
    assert "down" in done.stdout


def test_bad_setting_is_a_sentence_and_exit_9(stack):
    done = stack.cli("worker", "--count", "1", env={"SLESS_DEFAULT_TIMEOUT_S": "soon"})
    assert done.returncode == ExitStatus.CONFIG
    assert "SLESS_DEFAULT_TIMEOUT_S='soon' is not a valid float" in done.stderr


def test_a_second_daemon_on_a_taken_port_exits_9_instead_of_sharing_it(stack):
    """The HTTP server would share a port with another listener that allows it; the daemon
    refuses a port that is taken, with one sentence."""
    result = stack.cli("daemon", "--port", str(stack.port), timeout=30)
    assert result.returncode == 9, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{stack.port}" in result.stderr and "Traceback" not in result.stderr
    assert stack.get("/").status_code == 200  # the first one still serves


def test_up_runs_daemon_and_workers_and_ctrl_c_stops_all(logs_dir):
    import os
    import signal
    import subprocess

    from stack import Stack, sless_command, wait_until

    s = Stack(logs_dir, workers=0, daemon=False)
    log = open(logs_dir / f"up-{s.port}.log", "wb")
    up = subprocess.Popen(sless_command("up", "--count", "2"), env=s.env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        wait_until(lambda: s._answers("/") and len(s.live_workers()) == 2, 20, "sless up did not come up")
        assert s.post("/execute", {"code": "return input * 2;", "input": 21}).json()["result"] == 42
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 3  # the daemon and two workers
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=30) == 0
        for pid in children:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                       open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10, f"process {pid} outlived sless up")
        assert not s._answers("/")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        s.stop()


def test_server_commands_help_shows_the_variables_behind_their_options(stack):
    """Rich reads "[env X]" in a help text as markup and drops it: the help must show them."""
    for command, names in (("daemon", ("SLESS_HOST", "SLESS_PORT", "SLESS_REDIS_URL", "SLESS_MONGO_URL")),
                           ("worker", ("SLESS_REDIS_URL", "SLESS_MONGO_URL", "SLESS_LOG_FORMAT")),
                           ("up", ("SLESS_PORT", "SLESS_LOG_FORMAT"))):
        shown = stack.cli(command, "--help", env={"COLUMNS": "200"})
        assert shown.returncode == 0 and all(name in shown.stdout for name in names), shown.stdout


def test_up_stops_its_workers_and_exits_when_its_daemon_cannot_start(make_stack):
    """`sless up` on a port another daemon holds: its own daemon exits 9, and so does `up`,
    its workers stopped, instead of running workers with no API of their own."""
    s = make_stack(workers=0)
    done = s.cli("up", "--count", "1", "--port", str(s.port), timeout=60)
    assert done.returncode == 9, done.stdout + done.stderr
    assert "The daemon exited on its own (code 9)" in done.stderr and "The workers were stopped" in done.stderr
    assert s.live_workers() == []


def test_status_watch_on_a_terminal_uses_the_live_view(stack):
    """Run `sless status --watch` on a real pseudo-terminal and read what it drew."""
    import os
    import pty
    import subprocess

    from stack import sless_command

    job_id = stack.submit({"code": "import time; print('tick', flush=True); time.sleep(3); return 7", "timeout_s": 10})
    leader, follower = pty.openpty()
    env = {**stack.env, "SLESS_URL": stack.url, "COLUMNS": "100", "TERM": "xterm-256color"}
    watcher = subprocess.Popen(sless_command("status", job_id, "--watch"), env=env, stdout=follower,
                               stderr=follower, stdin=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    assert watcher.wait(timeout=30) == 0
    text = screen.decode(errors="replace")
    assert "running" in text or "submitted" in text
    assert "completed" in text and "7" in text and "elapsed" in text
    assert -1 < text.find("tick") < text.find("completed")  # the output's tail, live, before the job ended


def test_debug_flag_shows_a_traceback_for_unexpected_errors(stack):
    calm = stack.cli("status", "0" * 32, env={"SLESS_URL": "http://[::1"})
    assert calm.returncode == 10 and "Traceback" not in calm.stderr and "--debug" in calm.stderr
    loud = stack.cli("--debug", "status", "0" * 32, env={"SLESS_URL": "http://[::1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_submit_wait_asks_the_daemon_to_answer_in_time_and_follows_a_long_job(stack, tmp_path):
    """`sless submit --wait` sends `wait_s` (client.EXECUTE_WAIT_S), so the daemon answers
    (202) within the HTTP timeout however long the job runs, and the CLI follows the job from
    there. The real command, its two waits cut to 0.5 s and 2 s: a 4 s job outlasts both, so a
    call that let the daemon wait for the job would time out (exit 3)."""
    import subprocess
    import sys

    code = tmp_path / "slow.py"
    code.write_text("import time\ntime.sleep(4)\nreturn 'slept'")
    run_cli = ("import sys, sless.client; sless.client.EXECUTE_WAIT_S = 0.5; sless.client.HTTP_TIMEOUT_S = 2.0\n"
               "from sless.cli import main; sys.argv[0] = 'sless'; main()")
    done = subprocess.run([sys.executable, "-c", run_cli, "submit", str(code), "--timeout", "120", "--wait",
                           "--json"], env={**stack.env, "SLESS_URL": stack.url}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["result"] == "slept" and doc["state"] == "completed"


def test_an_error_that_names_an_accepted_job_shows_its_id():
    import requests

    from sless.client import error_message

    answer = requests.Response()
    answer.status_code, answer._content = 503, b'{"jobId": "abc123", "error": "MongoDB stopped answering."}'
    assert error_message(answer) == "MongoDB stopped answering. (job abc123)"
    answer._content = b'{"error": "Redis is unavailable."}'
    assert error_message(answer) == "Redis is unavailable."
