"""The OpenAPI document against the code, and the Postman collection against the document.

`sless_daemon/openapi.json` is the contract clients are built from, so it is checked
both ways: statically against Bottle's routing table (every route described, every
described path routed), and against a live daemon's answers, each checked by
schemathesis: first for jobs put in every state on purpose (answers random input
never reaches), then for the requests schemathesis itself generates from the document.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis

import sless_daemon
from sless_daemon.daemon import build_app
from sless_daemon.settings import Settings
from stack import MONGO_URL, REDIS_URL, Stack, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT_PATH = ROOT / "sless_daemon" / "openapi.json"
COLLECTION_PATH = ROOT / "examples" / "sless.postman_collection.json"
# The prototype README's request body, byte for byte (as in test_api.py): its JSON shapes are the contract.
PROTOTYPE_BODY = b'{\n  "code": "return input * 2;",\n  "input": 21\n}'
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 25  # fuzzed cases per operation, on top of the document's examples and the coverage cases
REQUEST_TIMEOUT_S = 30  # a hang guard per request, far above any answer's time once waits are cut
RUN_GUARD_S = 240  # a hang guard for the whole run, which takes about half a minute
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance"]


def load_document() -> dict:
    return json.loads(DOCUMENT_PATH.read_text())


def operations(document: dict) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the document describes."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS}


def openapi_path(rule: str) -> str:
    """A Bottle rule in OpenAPI's spelling: `/status/<job_id>` -> `/status/{job_id}`."""
    return re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", rule)


def bottle_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the app the daemon serves, built as `daemon.py` builds it.

    Nothing is requested: building only opens clients, which are closed again.
    """
    app, _ = build_app(Settings.from_env({}, redis_url=REDIS_URL, mongo_url=MONGO_URL))
    try:
        return {(route.method, openapi_path(route.rule)) for route in app.routes}
    finally:
        api = app.routes[0].callback.__self__  # the Api instance every route is a method of
        for store in (api.store, api.health.store):
            store.client.close()


# --- the document itself -----------------------------------------------------------

def test_document_is_valid_openapi_of_this_version():
    document = load_document()
    schemathesis.openapi.from_path(DOCUMENT_PATH).validate()  # raises with the offending part
    assert document["openapi"] == "3.0.3"
    assert document["info"]["version"] == sless_daemon.__version__


def test_every_route_is_described_and_every_described_path_is_routed():
    """Given the Bottle app and the document, then they list the same (method, path) pairs."""
    routes, described = bottle_routes(), operations(load_document())
    assert routes - described == set(), "routes the document does not describe"
    assert described - routes == set(), "operations the daemon does not route"


def test_the_public_routes_are_the_codes_and_the_prototype_example_is_the_submit_example():
    from sless_daemon.app import PUBLIC_ROUTES

    document = load_document()
    public = {(m, p) for m, p in operations(document) if document["paths"][p][m.lower()].get("security") == []}
    assert public == PUBLIC_ROUTES == {("GET", "/"), ("GET", "/openapi.json")}
    assert document["security"] == [{"bearerAuth": []}]
    submit = document["paths"]["/submit"]["post"]["requestBody"]["content"]["application/json"]
    assert submit["example"] == json.loads(PROTOTYPE_BODY)


# --- a live daemon answers as described -------------------------------------------------

@pytest.fixture(scope="module")
def token_stack(logs_dir):
    """A daemon with an API token and two workers, so 401s are real and every route needs the token."""
    started = Stack(logs_dir, workers=2, api_token=TOKEN).start()
    yield started
    started.stop()


def test_daemon_serves_the_packaged_document(token_stack):
    """GET /openapi.json answers the packaged file, without the token (as GET / does) so tools can import it."""
    answer = token_stack.get("/openapi.json")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == load_document()
    assert token_stack.get("/jobs").status_code == 401


@pytest.fixture(scope="module")
def served_schema(token_stack):
    """The document as the daemon serves it, aimed at the stack."""
    config = schemathesis.Config.from_dict({"base-url": token_stack.url})
    return schemathesis.openapi.from_url(token_stack.url + "/openapi.json", config=config, headers=AUTH,
                                         timeout=REQUEST_TIMEOUT_S)


class Calls:
    """Requests the document describes, each answer checked against it by CHECKS."""

    def __init__(self, schema):
        self.schema = schema
        self.checks = [getattr(schemathesis.checks, name) for name in CHECKS]

    def call(self, method: str, path: str, expected: int, job_id: str | None = None, auth: bool = True, **parts):
        """Send one request; the answer must have status `expected` and conform to the document."""
        case = self.schema[path][method].Case(path_parameters={"job_id": job_id} if job_id else None, **parts)
        answer = case.call_and_validate(checks=self.checks, headers=AUTH if auth else None,
                                        timeout=REQUEST_TIMEOUT_S)
        assert answer.status_code == expected, f"{method} {path}: {answer.status_code} {answer.text[:500]}"
        return answer

    def state(self, job_id: str) -> str:
        return self.call("GET", "/status/{job_id}", 200, job_id).json()["state"]


SLEEPER = {"code": "import time\ntime.sleep(60)\nreturn 1", "timeout_s": 60, "retries": 0}


def test_answers_about_ended_jobs_conform(served_schema):
    """Given a completed and a failed job, every job route answers about them as documented."""
    api = Calls(served_schema)
    completed = api.call("POST", "/execute", 200, body=json.loads(PROTOTYPE_BODY)).json()
    assert completed["state"] == "completed" and completed["result"] == 42
    failed = api.call("POST", "/execute", 200, body={"code": "raise ValueError('no')", "retries": 0}).json()
    assert failed["state"] == "failed" and failed["error"]["type"] == "exception"
    for job in (completed, failed):
        api.call("GET", "/logs/{job_id}", 200, job["jobId"])
        events = api.call("GET", "/events/{job_id}", 200, job["jobId"], query={"wait_s": 0}).json()
        assert [e["state"] for e in events["events"] if e["kind"] == "state"][-1] == job["state"]
        api.call("POST", "/cancel/{job_id}", 409, job["jobId"])
    api.call("POST", "/retry/{job_id}", 409, completed["jobId"])
    api.call("POST", "/retry/{job_id}", 202, failed["jobId"])
    listed = api.call("GET", "/jobs", 200, query={"state": "completed", "since": "2000-01-01T00:00:00Z"}).json()
    assert completed["jobId"] in [job["jobId"] for job in listed["jobs"]]


def test_answers_about_cancelled_jobs_conform(served_schema):
    """Given two workers busy with sleeping jobs and a third job queued behind them, when all three
    are cancelled, then the queued one answers 200 at once, the running ones 202, and all end cancelled."""
    api = Calls(served_schema)
    running = [api.call("POST", "/submit", 202, body=SLEEPER).json()["jobId"] for _ in range(2)]
    wait_until(lambda: all(api.state(job_id) == "running" for job_id in running), 60, "the sleepers did not start")
    queued = api.call("POST", "/submit", 202, body=SLEEPER).json()["jobId"]
    assert api.call("POST", "/cancel/{job_id}", 200, queued).json()["state"] == "cancelled"
    page = api.call("GET", "/events/{job_id}", 200, running[0], query={"wait_s": 0}).json()
    api.call("GET", "/events/{job_id}", 200, running[0], query={"after": page["cursor"], "wait_s": 0.1})
    api.call("GET", "/logs/{job_id}", 200, running[0])
    for job_id in running:
        assert api.call("POST", "/cancel/{job_id}", 202, job_id).json()["state"] == "running"
    wait_until(lambda: all(api.state(job_id) == "cancelled" for job_id in running), 60, "the sleepers went on")
    ended = api.call("GET", "/status/{job_id}", 200, running[0]).json()
    assert ended["error"]["type"] == "cancelled"
    api.call("POST", "/cancel/{job_id}", 409, queued)


def test_refusals_conform(served_schema, token_stack):
    """Unknown ids, bad parameters, oversized bodies and a missing token get the documented answers;
    unknown paths and methods get the JSON 404 and 405 the document's description promises."""
    api = Calls(served_schema)
    unknown = "0" * 32
    for method, path in (("GET", "/status/{job_id}"), ("GET", "/logs/{job_id}"), ("GET", "/events/{job_id}"),
                         ("POST", "/cancel/{job_id}"), ("POST", "/retry/{job_id}")):
        api.call(method, path, 404, unknown)
        api.call(method, path, 404, "abc123")
    api.call("GET", "/events/{job_id}", 400, unknown, query={"after": "not-a-cursor"})
    api.call("GET", "/jobs", 400, query={"limit": 0})
    api.call("POST", "/execute", 400, body={"code": "return 1", "wait_s": -1})
    api.call("POST", "/submit", 413, body={"code": "x" * (2 << 20)})  # past the limit: the daemon's JSON 413
    huge = api.call("POST", "/submit", 413, body={"code": "x" * (5 << 20)})  # refused before it is read
    assert "the limit is" in huge.json()["error"]
    api.call("POST", "/submit", 401, auth=False, body=json.loads(PROTOTYPE_BODY))
    assert token_stack.get("/nope").json() == {"error": "No such endpoint."}
    refused = token_stack.get("/submit")
    assert refused.status_code == 405 and refused.headers["Allow"] == "POST" and "error" in refused.json()


def schemathesis_run(stack: Stack) -> list[str]:
    """`schemathesis run` against the document the daemon serves, with its answers checked by CHECKS.

    The stack's URL is given as the base (the document's server is relative: the daemon
    serving it). Waits are cut by openapi_hooks. No Hypothesis database is kept.
    """
    return [sys.executable, "-m", "schemathesis.cli", "run", f"{stack.url}/openapi.json", "--url", stack.url,
            "--header", f"Authorization: Bearer {TOKEN}", "--checks", ",".join(CHECKS),
            "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(MAX_EXAMPLES),
            "--generation-database", "none", "--request-timeout", str(REQUEST_TIMEOUT_S),
            "--suppress-health-check", "all", "--no-color"]


def test_live_answers_conform_to_the_document(token_stack, tmp_path):
    """Every operation, fed the document's examples, its coverage cases (boundaries, missing and
    wrong fields), a few fuzzed cases and the chains its links describe (submit, then status,
    events, logs, cancel or retry of that very job), answers without a server error, with a
    documented status code, content type, headers and body. (Schemathesis leaves out the
    operation that served the document, GET /openapi.json: the test above covers it.)

    Run from a temporary directory, so Hypothesis writes nothing into the repository.
    Bounded to stay near a minute on two cores: MAX_EXAMPLES fuzzed cases per operation, and
    openapi_hooks cuts /execute's `wait_s` to 1 s and /events' to 0.5 s (a cut /execute
    answers a documented 202, a cut /events an empty page).
    """
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "openapi_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(schemathesis_run(token_stack), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=RUN_GUARD_S)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]


# --- the Postman collection follows the document -----------------------------------------

def postman_items(items: list[dict]) -> list[dict]:
    """Every request item of a collection (request, scripts), folders flattened."""
    found = []
    for item in items:
        found.extend(postman_items(item["item"]) if "item" in item else [item])
    return found


def postman_operation(request: dict) -> tuple[str, str]:
    """(METHOD, OpenAPI path) a Postman request calls: `{{jobId}}` stands for `{job_id}`."""
    path = "/" + "/".join(request["url"]["path"])
    return request["method"], path.replace("{{jobId}}", "{job_id}")


def test_postman_collection_has_a_request_for_every_operation():
    collection = json.loads(COLLECTION_PATH.read_text())
    assert collection["info"]["schema"].endswith("/v2.1.0/collection.json")
    called = {postman_operation(item["request"]) for item in postman_items(collection["item"])}
    described = operations(load_document())
    assert described - called == set(), "operations without a request"
    assert called - described == set(), "requests for undescribed operations"
    variables = {v["key"]: v["value"] for v in collection["variable"]}
    assert variables["baseUrl"] == "http://127.0.0.1:3000" and {"token", "jobId"} <= set(variables)
    assert collection["auth"] == {"type": "bearer", "bearer": [{"key": "token", "value": "{{token}}",
                                                                "type": "string"}]}


def test_postman_submit_sends_the_prototype_example_and_keeps_the_job_id():
    collection = json.loads(COLLECTION_PATH.read_text())
    submit = next(item for item in postman_items(collection["item"])
                  if postman_operation(item["request"]) == ("POST", "/submit"))
    assert submit["request"]["body"]["raw"].encode() == PROTOTYPE_BODY
    script = "\n".join(line for event in submit["event"] if event["listen"] == "test"
                       for line in event["script"]["exec"])
    assert 'pm.collectionVariables.set("jobId", body.jobId)' in script
