"""End to end over HTTP: a real daemon and real workers on real Redis and FerretDB."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_prototype_example_verbatim(stack):
    """Given the prototype README's request, when submitted, then status reaches completed with 42."""
    answer = stack.post("/submit", b'{\n  "code": "return input * 2;",\n  "input": 21\n}',
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 202
    body = answer.json()
    assert body["status"] == "submitted" and set(body) == {"jobId", "status"}
    doc = stack.wait_terminal(body["jobId"])
    assert doc["jobId"] == body["jobId"]
    assert doc["state"] == "completed"
    assert doc["result"] == 42
    assert doc["error"] is None and doc["attempts"] == 1


def test_record_is_in_mongo_before_the_answer(stack):
    """The jobs collection holds the record as soon as /submit answered."""
    job_id = stack.submit({"code": "return input", "input": {"big": 2 ** 80}})
    stored = stack.mongo_jobs().find_one({"_id": job_id})
    assert stored is not None and stored["code"] == "return input" and stored["input_json"] == '{"big": %d}' % 2 ** 80
    assert stack.wait_terminal(job_id)["result"] == {"big": 2 ** 80}


def test_status_document_shape(stack):
    doc = stack.wait_terminal(stack.submit({"code": "print('hi'); return [input, None]", "input": "x"}))
    for key in ("jobId", "state", "result", "error", "attempts", "stdout", "stderr", "submitted_at",
                "started_at", "finished_at", "duration_ms"):
        assert key in doc
    assert doc["result"] == ["x", None]
    assert doc["stdout"] == "hi\n"
    assert doc["submitted_at"] <= doc["started_at"] <= doc["finished_at"]
    assert doc["duration_ms"] > 0


def test_module_with_main_and_custom_entry(stack):
    code = (EXAMPLES / "greet.py").read_text()
    doc = stack.wait_terminal(stack.submit({"code": code, "input": {"name": "Ada", "times": 2}}))
    assert doc["result"] == {"greeting": "Hello, Ada! Hello, Ada!", "length": 3}
    custom = "def handler(x):\n    return x + 1\n"
    assert stack.wait_terminal(stack.submit({"code": custom, "input": 1, "entry": "handler"}))["result"] == 2
    missing = stack.wait_terminal(stack.submit({"code": custom, "input": 1, "entry": "nope"}))
    assert missing["state"] == "failed" and missing["error"]["type"] == "entry"
    assert missing["attempts"] == 1


def test_exception_is_retried_then_failed_with_every_error_kept(stack):
    doc = stack.wait_terminal(stack.submit({"code": (EXAMPLES / "fail.py").read_text(), "input": 7, "retries": 2}))
    assert doc["state"] == "failed"
    assert doc["error"] == {"type": "exception", "message": "ValueError: cannot handle input 7"}
    assert doc["attempts"] == 3
    assert [e["attempt"] for e in doc["attempt_errors"]] == [1, 2, 3]
    assert "Traceback" in doc["stderr"]


def test_syntax_error_is_not_retried(stack):
    doc = stack.wait_terminal(stack.submit({"code": "return (", "input": 1, "retries": 3}))
    assert doc["state"] == "failed"
    assert doc["error"]["type"] == "syntax"
    assert doc["attempts"] == 1


def test_timeout_kills_the_attempt(stack):
    doc = stack.wait_terminal(stack.submit({"code": "while True: pass", "timeout_s": 0.5, "retries": 1}))
    assert doc["state"] == "failed"
    assert doc["error"]["type"] == "timeout"
    assert doc["attempts"] == 2
    assert doc["duration_ms"] < 3000  # the limit fired: the attempt was cut near 0.5 s


def test_retry_succeeds_on_a_later_attempt(stack):
    doc = stack.wait_terminal(stack.submit({"code": (EXAMPLES / "flaky.py").read_text(), "input": "x"}))
    assert doc["state"] == "completed"
    assert doc["result"] == {"attempt": 2, "input": "x"}
    assert doc["attempts"] == 2
    assert doc["attempt_errors"][0]["type"] == "exception"


def test_result_not_json_serialisable_fails_clearly(stack):
    doc = stack.wait_terminal(stack.submit({"code": "return {1, 2}", "retries": 2}))
    assert doc["state"] == "failed" and doc["attempts"] == 1
    assert doc["error"]["type"] == "invalid_result"
    assert "not JSON-serialisable" in doc["error"]["message"]


def test_every_limit_can_be_set_per_job(stack):
    code = ("import resource, os\n"
            "return [resource.getrlimit(resource.RLIMIT_NOFILE)[0], resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20,"
            " resource.getrlimit(resource.RLIMIT_CPU)[0], os.statvfs('/work').f_blocks * os.statvfs('/work').f_frsize >> 20]")
    doc = stack.wait_terminal(stack.submit({"code": code, "open_files": 32, "file_mb": 3, "cpu_s": 2, "tmpfs_mb": 5,
                                            "processes": 8, "output_bytes": 2048, "result_bytes": 4096}))
    assert doc["result"] == [32, 3, 2, 5], doc
    assert doc["limits"]["processes"] == 8 and doc["limits"]["output_bytes"] == 2048
    chatty = stack.wait_terminal(stack.submit({"code": "print('x' * 5000)", "output_bytes": 1024}))
    assert chatty["stdout"].startswith("x" * 1024) and "truncated" in chatty["stdout"]
    threads = ("import threading, time\nts = [threading.Thread(target=time.sleep, args=(1,)) for _ in range(20)]\n"
               "[t.start() for t in ts]")
    assert stack.wait_terminal(stack.submit({"code": threads, "processes": 8, "retries": 0}))["state"] == "failed"
    big = stack.wait_terminal(stack.submit({"code": "return 'y' * 5000", "result_bytes": 4096}))
    assert big["error"]["type"] == "result_limit"


def test_memory_limit(stack):
    doc = stack.wait_terminal(stack.submit({"code": "x = bytearray(200 << 20); return 1", "memory_mb": 64,
                                            "retries": 0}))
    assert doc["state"] == "failed" and doc["error"]["type"] == "memory"


def test_execute_answers_with_the_final_status(stack):
    answer = stack.post("/execute", {"code": "return input * 2;", "input": 21})
    assert answer.status_code == 200
    assert answer.json()["state"] == "completed" and answer.json()["result"] == 42


def test_execute_answers_202_with_the_same_shape_when_wait_runs_out(stack):
    answer = stack.post("/execute", {"code": "import time; time.sleep(1.5); return 1", "wait_s": 0.2})
    assert answer.status_code == 202
    doc = answer.json()
    assert doc["state"] in ("submitted", "running") and doc["jobId"]
    assert stack.wait_terminal(doc["jobId"])["result"] == 1


def test_unknown_id_is_404_json(stack):
    for job_id in ("0" * 32, "abc123", "x" * 500):
        answer = stack.get(f"/status/{job_id}")
        assert answer.status_code == 404
        assert "No job has the id" in answer.json()["error"]


def test_unknown_route_and_method_are_json(stack):
    assert stack.get("/nope").status_code == 404 and "error" in stack.get("/nope").json()
    answer = stack.get("/submit")
    assert answer.status_code == 405 and "error" in answer.json()


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (json.dumps({"input": 1}).encode(), 400, "'code' is missing"),
    (json.dumps({"code": 42}).encode(), 400, "'code' must be a string"),
    (json.dumps({"code": "  "}).encode(), 400, "'code' is empty"),
    (json.dumps({"code": "return 1\u0000"}).encode(), 400, "contains a NUL character"),
    (json.dumps({"code": "return 1", "timeout_s": "5"}).encode(), 400, "'timeout_s' must be a number"),
    (json.dumps({"code": "return 1", "timeout_s": 0}).encode(), 400, "'timeout_s' must be between"),
    (json.dumps({"code": "return 1", "timeout_s": 10_000}).encode(), 400, "'timeout_s' must be between"),
    (json.dumps({"code": "return 1", "memory_mb": 1.5}).encode(), 400, "'memory_mb' must be a whole number"),
    (json.dumps({"code": "return 1", "memory_mb": 1 << 30}).encode(), 400, "'memory_mb' must be between"),
    (json.dumps({"code": "return 1", "retries": -1}).encode(), 400, "'retries' must be between"),
    (json.dumps({"code": "return 1", "retries": True}).encode(), 400, "'retries' must be a whole number"),
    (json.dumps({"code": "return 1", "entry": "not a name"}).encode(), 400, "'entry' must be"),
    (json.dumps({"code": "return 1", "timeout": 5}).encode(), 400, "Unknown field 'timeout'"),
    (json.dumps({"code": "return 1", "processes": 1}).encode(), 400, "'processes' must be between 4 and 1024"),
    (json.dumps({"code": "return 1", "tmpfs_mb": 1 << 20}).encode(), 400, "'tmpfs_mb' must be between"),
    (json.dumps({"code": "return 1", "result_bytes": "big"}).encode(), 400, "'result_bytes' must be a whole number"),
    (json.dumps({"code": "x" * (2 << 20)}).encode(), 413, "the limit is"),
    (b'{"code": "return 1", "timeout_s": 1' + b"0" * 400 + b"}", 400, "'timeout_s' must be between 0.1 and"),
    (b'{"code": "return 1", "cpu_s": NaN}', 400, "'cpu_s' must be between"),
    (b'{"code": "return 1", "timeout_s": -Infinity}', 400, "got -inf"),
    (b'{"code": "return 1", "memory_mb": 1' + b"0" * 400 + b"}", 400, "(401 digits)"),
])
def test_bad_submissions_get_specific_errors_and_leave_nothing(stack, body, status, fragment):
    jobs_before = stack.mongo_jobs().count_documents({})
    for path in ("/submit", "/execute"):
        answer = stack.post(path, body)
        assert answer.status_code == status, answer.text
        assert fragment in answer.json()["error"]
    assert stack.mongo_jobs().count_documents({}) == jobs_before


def test_execute_validates_wait_s(stack):
    answer = stack.post("/execute", {"code": "return 1", "wait_s": -1})
    assert answer.status_code == 400 and "'wait_s'" in answer.json()["error"]
    answer = stack.post("/execute", b'{"code": "return 1", "wait_s": 1' + b"0" * 400 + b"}")
    assert answer.status_code == 400 and "'wait_s' must be between" in answer.json()["error"]


def test_an_input_nested_too_deeply_is_refused_alone(make_stack):
    """Inputs nested about as deeply as the interpreter can parse (900-999 levels on 3.11,
    where Python frames count toward the limit; 1,500, 3,000 and 100,000 for the C limits
    of later versions), submitted among ordinary ones: each deep one is accepted or refused
    on its own (400), never a 500, and never fails the ordinary submits written in the same
    group (intake.GroupCommit)."""
    stack = make_stack(workers=0)
    depths = [*range(900, 1000), 1500, 3000, 100_000]
    deep = [b'{"code": "return 1", "input": ' + b"[" * depth + b"]" * depth + b"}" for depth in depths]
    plain = [{"code": "return input", "input": n} for n in range(len(depths))]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: stack.post("/submit", body), [b for pair in zip(deep, plain) for b in pair]))
    deep_answers, plain_answers = answers[0::2], answers[1::2]
    assert [a.status_code for a in plain_answers] == [202] * len(depths)
    assert {a.status_code for a in deep_answers} <= {202, 400}, [a.text for a in deep_answers if a.status_code >= 500]
    refused = [a.json()["error"] for a in deep_answers if a.status_code == 400]
    assert refused and all("nested too deeply" in e or "not valid JSON" in e for e in refused)


def test_health_endpoints(stack):
    assert stack.get("/").json()["status"] == "ok"
    redis_check = stack.get("/redis").json()
    assert redis_check["status"] == "ok" and redis_check["latency_ms"] >= 0
    mongo = stack.get("/mongo").json()
    assert mongo["status"] == "ok" and "jobs" in mongo["collections"]
    full = stack.get("/health").json()
    assert full["queue"]["live_workers"] == 2


def test_submit_lands_on_the_compute_tasks_queue(make_stack):
    """With no workers, the accepted job waits in the RQ queue named `compute-tasks`."""
    s = make_stack(workers=0, queue_name="compute-tasks")
    stack_redis = s.redis()
    before = stack_redis.llen("rq:queue:compute-tasks")
    job_id = s.submit({"code": "return 1"})
    assert stack_redis.llen("rq:queue:compute-tasks") == before + 1
    assert s.get(f"/status/{job_id}").json()["state"] == "submitted"


def test_failed_job_can_be_retried_as_a_new_attempt(stack):
    code = "def main(x, context):\n    if context['attempt'] < 3:\n        raise RuntimeError('not yet')\n    return 'third time'"
    job_id = stack.submit({"code": code, "retries": 1})
    failed = stack.wait_terminal(job_id)
    assert failed["state"] == "failed" and failed["attempts"] == 2
    again = stack.post(f"/retry/{job_id}", b"")
    assert again.status_code == 202 and again.json()["state"] in ("submitted", "running", "completed")
    doc = stack.wait_terminal(job_id)
    assert doc["state"] == "completed" and doc["result"] == "third time" and doc["attempts"] == 3
    assert [e["attempt"] for e in doc["attempt_errors"]] == [1, 2]
    conflict = stack.post(f"/retry/{job_id}", b"")
    assert conflict.status_code == 409 and "only failed jobs" in conflict.json()["error"]
    assert stack.post("/retry/" + "0" * 32, b"").status_code == 404


def test_cli_retry(stack):
    job_id = stack.submit({"code": "raise ValueError('always')", "retries": 0})
    stack.wait_terminal(job_id)
    done = stack.cli("retry", job_id, "--wait", "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["attempts"] == 2
    ok_id = stack.submit({"code": "return 1"})
    stack.wait_terminal(ok_id)
    conflict = stack.cli("retry", ok_id)
    assert conflict.returncode == 12 and "only failed jobs" in conflict.stderr


def test_execute_answers_a_large_outcome_from_the_record(stack):
    """Large outcomes are announced without their output: /execute reads them back."""
    answer = stack.post("/execute", {"code": "print('y' * 20000)\nreturn 'x' * 10000"})
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["result"] == "x" * 10000 and doc["stdout"] == "y" * 20000 + "\n"
