"""The HTTP API: routes that validate requests, accept jobs and report their status.

Built from its parts by `make_app`; no user code ever runs here. Every answer is
JSON, errors included: {"error": "<one sentence>"} with a fitting status code.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time

import bottle

from . import __version__
from .errors import BadRequest, DependencyDown
from .health import HealthChecker
from .lifecycle import Lifecycle
from .settings import Settings
from .spec import EXECUTE_FIELDS, number_field, parse_body, parse_job
from .states import JobState
from .status import status_document
from .store import derive

log = logging.getLogger("sless.daemon")

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_WAIT_S = 3600.0
PUBLIC_ROUTES = {("GET", "/")}


def json_response(status: int, payload: dict) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(payload), status=status, headers={"Content-Type": "application/json"},
    )


def error_response(status: int, message: str) -> bottle.HTTPResponse:
    return json_response(status, {"error": message})


def read_body(request: bottle.LocalRequest, max_bytes: int) -> bytes:
    """The raw body, refusing more than `max_bytes` before reading it all."""
    if request.content_length > max_bytes:
        raise BadRequest(f"The request body is {request.content_length} bytes; the limit is {max_bytes}.", 413)
    body = request.environ["wsgi.input"].read(max_bytes + 1) if request.content_length != 0 else b""
    if len(body) > max_bytes:
        raise BadRequest(f"The request body is larger than the limit of {max_bytes} bytes.", 413)
    return body


def check_token(request: bottle.LocalRequest, token: str) -> None:
    """Require `Authorization: Bearer <token>` when a token is configured."""
    if not token or (request.method, request.path) in PUBLIC_ROUTES:
        return
    given = request.get_header("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise BadRequest("This endpoint needs the header 'Authorization: Bearer <token>' with the API token.", 401)


class Api:
    """The routes, with the collaborators they need passed in."""

    def __init__(self, settings: Settings, lifecycle: Lifecycle, health: HealthChecker):
        self.settings = settings
        self.lifecycle = lifecycle
        self.store = lifecycle.store
        self.health = health

    def index(self):
        return {"service": "sless", "status": "ok", "version": __version__}

    def redis(self):
        status = self.health.redis()
        return json_response(200 if status["status"] == "ok" else 503, {"dependency": "redis", **status})

    def mongo(self):
        status = self.health.mongo()
        return json_response(200 if status["status"] == "ok" else 503, {"dependency": "mongodb", **status})

    def health_all(self):
        """Everything `sless health` shows, in one call."""
        started = time.perf_counter()
        checks = self.health.everything()
        daemon = {"status": "ok", "version": __version__, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
        healthy = all(c["status"] == "ok" for c in checks.values())
        return json_response(200 if healthy else 503, {"status": "ok" if healthy else "degraded", "daemon": daemon,
                                                       **checks})

    def submit(self):
        started = time.perf_counter()
        spec = parse_job(parse_body(read_body(bottle.request, self.settings.max_body_bytes)), self.settings)
        stages = {"parse": time.perf_counter() - started}
        job_id = self.lifecycle.accept(spec, stages)
        response = json_response(202, {"jobId": job_id, "status": JobState.SUBMITTED.value})
        response.set_header("Server-Timing", ", ".join(f"{name};dur={s * 1000:.3f}" for name, s in stages.items()))
        return response

    def execute(self):
        data = parse_body(read_body(bottle.request, self.settings.max_body_bytes))
        spec = parse_job({k: v for k, v in data.items() if k != "wait_s"}, self.settings, EXECUTE_FIELDS)
        wait_s = number_field(data, "wait_s", spec.timeout_s + self.settings.execute_margin_s, 0, MAX_WAIT_S)
        submitted = self.lifecycle.accept_document(spec)
        job_id = submitted["_id"]
        job = self.wait_for_end(submitted, wait_s)
        if job is None:
            return json_response(503, {"jobId": job_id, "error": "The job was accepted, but MongoDB stopped answering "
                                       "while waiting for it; poll GET /status/<jobId>."})
        return json_response(200 if JobState(job["state"]).is_terminal else 202, status_document(job))

    def wait_for_end(self, submitted: dict, wait_s: float) -> dict | None:
        """Wait for the job's attempts to be announced (queue.announce_settled) until it is
        terminal or `wait_s` passes; return the job as last seen. Without Redis, it polls.

        A first attempt's settle event completes the document just submitted, so the
        answer needs no read of MongoDB (the event was written there before it was
        announced); a job with earlier attempts is read back for their errors.
        """
        job_id = submitted["_id"]
        deadline = time.monotonic() + wait_s
        job = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.lifecycle.queue.wait_settled(job_id, min(max(remaining, 0.0), WAKE_CHECK_S))
            except DependencyDown:
                event = None
                time.sleep(min(max(remaining, 0.0), 0.1))
            if event and "changes" in event and event["attempt"] == 1 and JobState(event["state"]).is_terminal:
                return derive(submitted, [event], [])  # a whole event (a large one is announced without outcome)
            try:
                job = self.store.get(job_id)
            except DependencyDown:
                pass
            if (job and JobState(job["state"]).is_terminal) or deadline - time.monotonic() <= 0:
                return job

    def retry(self, job_id: str):
        """Dead letters: a failed job runs again as a new attempt."""
        if not JOB_ID_PATTERN.match(job_id):
            return error_response(404, f"No job has the id {job_id[:64]!r}.")
        return json_response(202, status_document(self.lifecycle.reopen(job_id)))

    def status(self, job_id: str):
        job = self.store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
        if job is None:
            return error_response(404, f"No job has the id {job_id[:64]!r}.")
        return status_document(job)


WAKE_CHECK_S = 1.0  # read the record at least this often while waiting, in case an announcement is lost


def make_app(settings: Settings, lifecycle: Lifecycle, health: HealthChecker) -> bottle.Bottle:
    """Build the WSGI application from its collaborators."""
    api = Api(settings, lifecycle, health)
    app = bottle.Bottle(autojson=True)
    app.route("/", "GET", api.index)
    app.route("/redis", "GET", api.redis)
    app.route("/mongo", "GET", api.mongo)
    app.route("/health", "GET", api.health_all)
    app.route("/submit", "POST", api.submit)
    app.route("/execute", "POST", api.execute)
    app.route("/status/<job_id>", "GET", api.status)
    app.route("/retry/<job_id>", "POST", api.retry)
    app.install(error_plugin(settings))
    for code, message in ((404, "No such endpoint."), (405, "This endpoint does not allow that method.")):
        app.error(code)(_json_error(code, message))
    app.error(500)(_json_error(500, "Internal error; the daemon's log has the details."))
    return app


def unavailable_message(dependency: str, method: str) -> str:
    if method == "POST":
        return f"{dependency} is unavailable, so the job was not accepted; try again shortly."
    return f"{dependency} is unavailable; try again shortly."


def _json_error(code: int, message: str):
    def handler(error: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": message})

    return handler


def error_plugin(settings: Settings):
    """Turn sless errors into JSON answers; check the token before any route runs."""

    def plugin(callback):
        def wrapper(*args, **kwargs):
            try:
                check_token(bottle.request, settings.api_token)
                return callback(*args, **kwargs)
            except BadRequest as e:
                return error_response(e.status, str(e))
            except DependencyDown as e:
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, e)
                return error_response(503, unavailable_message(e.dependency, bottle.request.method))

        return wrapper

    return plugin
