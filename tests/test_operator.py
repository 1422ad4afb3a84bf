"""Operator tools on a real stack: live feed (long poll), logs, listing, cancel, metrics, CLI conventions."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sless.exit_codes import ExitStatus
from stack import ROOT, sless_command, wait_until

# a line on each stream, a pause long enough to look while it runs, another line
TALKER = ("import sys, time\nprint('line one', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n"
          "time.sleep(4)\nprint('line two', flush=True)\ntime.sleep(0.5)\nreturn 'talked'")
SLEEPER = "import time\ntime.sleep(60)\nreturn 'woke'"


def state_of(stack, job_id: str) -> str:
    return stack.get(f"/status/{job_id}").json()["state"]


def test_events_long_poll_returns_the_feed_in_order_and_waits_for_more(stack):
    job_id = stack.submit({"code": TALKER, "timeout_s": 10})
    seen, cursor = [], "0-0"
    while not any(e["kind"] == "state" and e["state"] == "completed" for e in seen):
        page = stack.get(f"/events/{job_id}", params={"after": cursor, "wait_s": 10}, timeout=30).json()
        assert page["jobId"] == job_id and page["events"], page  # a 10 s wait always has news within it
        seen += page["events"]
        cursor = page["cursor"]
    kinds = [(e["kind"], e.get("state") or e.get("stream")) for e in seen]
    assert kinds[0] == ("state", "running") and kinds[-1] == ("state", "completed")
    text = "".join(e["text"] for e in seen if e["kind"] == "output" and e["stream"] == "stdout")
    assert text == "line one\nline two\n"
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)
    quiet = stack.get(f"/events/{job_id}", params={"after": cursor, "wait_s": 0.3}).json()
    assert quiet == {"jobId": job_id, "cursor": cursor, "events": []}


def test_events_refuses_bad_cursors_and_waits_and_unknown_jobs(stack):
    job_id = stack.submit({"code": "return 1"})
    for params, needle in (({"after": "yesterday"}, "cursor"), ({"wait_s": "61"}, "between 0 and 60"),
                           ({"wait_s": "soon"}, "must be a number")):
        answer = stack.get(f"/events/{job_id}", params=params)
        assert answer.status_code == 400 and needle in answer.json()["error"], answer.text
    assert stack.get(f"/events/{'0' * 32}", params={"wait_s": 0}).status_code == 404
    assert stack.get("/events/not-an-id").status_code == 404


def test_logs_follow_streams_output_while_the_job_runs(stack):
    job_id = stack.submit({"code": TALKER, "timeout_s": 10})
    follower = subprocess.Popen(sless_command("logs", job_id, "--follow"), env={**stack.env, "SLESS_URL": stack.url},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = follower.stdout.readline()
        assert first == "line one\n"
        assert state_of(stack, job_id) == "running"  # the line came while the job still ran
        rest, errors = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0, errors
    assert rest == "line two\n" and "to stderr" in errors
    finished = stack.cli("logs", job_id)
    assert finished.returncode == 0 and finished.stdout == "line one\nline two\n"
    assert json.loads(stack.cli("logs", job_id, "--json").stdout)["stderr"] == "to stderr\n"


def test_logs_of_an_unknown_job_exit_4(stack):
    done = stack.cli("logs", "f" * 32)
    assert done.returncode == ExitStatus.NOT_FOUND and "No job has the id" in done.stderr


def test_status_watch_json_prints_one_object_per_change(stack):
    job_id = stack.submit({"code": "import time\ntime.sleep(3)\nreturn 3"})
    wait_until(lambda: state_of(stack, job_id) == "running", 10, "the job did not start")
    watched = stack.cli("status", job_id, "--watch", "--json")
    docs = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.returncode == 0
    assert [d["state"] for d in docs] == ["running", "completed"] and docs[-1]["result"] == 3


def test_list_shows_recent_jobs_and_filters_them(make_stack):
    s = make_stack(workers=1)
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    ok = [s.submit({"code": f"return {i}"}) for i in range(3)]
    bad = s.submit({"code": "raise ValueError('no')", "retries": 0})
    for job_id in ok + [bad]:
        s.wait_terminal(job_id)
    listed = json.loads(s.cli("list", "--json").stdout)
    assert [j["jobId"] for j in listed["jobs"]] == [bad] + ok[::-1]  # newest first
    assert listed["jobs"][0]["error"]["type"] == "exception" and "result" not in listed["jobs"][0]
    failed = json.loads(s.cli("list", "--state", "failed", "--json").stdout)["jobs"]
    assert [j["jobId"] for j in failed] == [bad]
    assert len(json.loads(s.cli("list", "--limit", "2", "--json").stdout)["jobs"]) == 2
    since = before.isoformat().replace("+00:00", "Z")
    assert json.loads(s.cli("list", "--since", since, "--json").stdout)["count"] == 4
    assert json.loads(s.cli("list", "--since", "1h", "--json").stdout)["count"] == 4
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert s.get("/jobs", params={"since": future}).json() == {"jobs": [], "count": 0}
    table = s.cli("list")
    assert table.returncode == 0 and bad in table.stdout and "failed" in table.stdout
    for params, needle in (({"state": "lost"}, "'state' must be one of"), ({"limit": "0"}, "between 1 and 1000"),
                           ({"limit": "2.5"}, "whole number"), ({"since": "last week"}, "ISO 8601"),
                           ({"limit": "1" + "0" * 400}, "between 1 and 1000"),
                           ({"since": "0001-01-01T00:00:00+23:59"}, "ISO 8601")):
        answer = s.get("/jobs", params=params)
        assert answer.status_code == 400 and needle in answer.json()["error"], answer.text
    assert s.cli("list", "--state", "lost").returncode == ExitStatus.REJECTED
    too_far = s.cli("list", "--since", "1000000d")
    assert too_far.returncode == ExitStatus.USAGE and "before the year 1" in too_far.stderr, too_far.stderr


def test_cancel_a_queued_job_and_it_never_runs(make_stack):
    s = make_stack(workers=0)
    job_id = s.submit({"code": "open('/work/ran', 'w')\nreturn 'ran'"})
    done = s.cli("cancel", job_id, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["state"] == "cancelled" and doc["error"]["type"] == "cancelled" and doc["result"] is None
    s.workers = 1
    s.start_pool()
    after = s.submit({"code": "return 'after'"})  # queued behind the cancelled one's message
    assert s.wait_terminal(after)["result"] == "after"
    assert state_of(s, job_id) == "cancelled"
    claims = list(s.mongo_jobs().database["events"].find({"job_id": job_id, "step": "claim"}))
    assert [c["owner"] for c in claims] == ["(cancelled)"]  # the fence; no worker ever claimed it
    again = s.cli("cancel", job_id)
    assert again.returncode == ExitStatus.CONFLICT and "already ended (cancelled)" in again.stderr


def test_cancel_a_running_job_kills_its_sandbox(stack):
    job_id = stack.submit({"code": SLEEPER, "timeout_s": 120, "retries": 2})
    wait_until(lambda: state_of(stack, job_id) == "running", 10, "the job did not start")
    done = stack.cli("cancel", job_id)
    assert done.returncode == 0 and "cancelled" in done.stderr, done.stderr
    doc = stack.get(f"/status/{job_id}").json()
    assert doc["state"] == "cancelled" and doc["attempts"] == 1, doc  # not retried
    assert doc["error"] == {"type": "cancelled", "message": "Cancelled on request; the attempt's sandbox was killed."}
    assert doc["duration_ms"] < 60_000  # killed, not slept out: the code sleeps 60 s
    assert stack.cli("status", job_id).returncode == ExitStatus.JOB_CANCELLED
    assert stack.post(f"/cancel/{job_id}", None).status_code == 409
    assert stack.submit({"code": "return 5"})  # the worker goes on with a new sandbox
    assert stack.cli("submit", "-", "--wait", input="return 5").stdout.strip() == "5"


def test_cancel_of_a_finished_job_is_refused_and_unknown_ids_are_404(stack):
    job_id = stack.submit({"code": "return 1"})
    stack.wait_terminal(job_id)
    refused = stack.cli("cancel", job_id)
    assert refused.returncode == ExitStatus.CONFLICT and "already ended (completed)" in refused.stderr
    assert stack.cli("cancel", "0" * 32).returncode == ExitStatus.NOT_FOUND
    assert stack.post("/cancel/nope", None).status_code == 404


def metric_values(stack) -> dict:
    """{(name, labels as a sorted tuple): value} from GET /metrics, parsed by prometheus-client."""
    answer = stack.get("/metrics")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def test_metrics_count_every_workers_jobs_in_prometheus_format(make_stack):
    s = make_stack(workers=2)
    jobs = [s.submit({"code": "import time\ntime.sleep(0.2)\nreturn 1"}) for _ in range(8)]
    jobs.append(s.submit({"code": "raise KeyError(1)", "retries": 0}))
    jobs.append(s.submit({"code": "return (", "retries": 0}))
    docs = [s.wait_terminal(job_id) for job_id in jobs]
    assert len({d["worker"] for d in docs[:8]}) == 2  # both worker processes ran some
    wait_until(lambda: metric_values(s).get(("sless_duration_seconds_count", ())) == 10, 10, "metrics lag")
    values = metric_values(s)
    assert values[("sless_attempts_ended_total", (("error_type", ""), ("state", "completed")))] == 8
    assert values[("sless_attempts_ended_total", (("error_type", "exception"), ("state", "failed")))] == 1
    assert values[("sless_attempts_ended_total", (("error_type", "syntax"), ("state", "failed")))] == 1
    assert values[("sless_jobs_submitted_total", ())] == 10
    assert values[("sless_duration_seconds_bucket", (("le", "0.1"),))] <= 2  # the sleepers took 0.2 s
    assert values[("sless_duration_seconds_bucket", (("le", "+Inf"),))] == 10
    assert values[("sless_queue_wait_seconds_count", ())] == 10
    assert values[("sless_sandbox_start_seconds_count", ())] == 10
    assert values[("sless_live_workers", ())] == 2 and values[("sless_queue_depth", ())] == 0
    s.get("/status/nope")
    assert metric_values(s)[("sless_requests_rejected_total", (("status", "404"),))] >= 1


def test_every_command_takes_json():
    import typer.main

    from sless.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert "--json" in [opt for param in command.params for opt in param.opts], name


def test_every_exit_code_is_listed_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", readme, re.MULTILINE)}
    assert listed == {int(code) for code in ExitStatus}


def test_shell_completion_script(stack):
    done = stack.cli("--show-completion", "bash")
    assert done.returncode == 0 and "complete -o" in done.stdout and "SLESS_COMPLETE" in done.stdout.upper()
